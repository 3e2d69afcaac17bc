// muster._core: the pybind11 module under the `muster` Python package (python/muster/).
//
// It exposes the C++ Checkpointer with a flat, pointer-level interface: the Python layer
// (python/muster/checkpoint.py) walks the user's nested state, turns each tensor or array into
// (name, dtype, shape, box, data pointer, memory kind) and keeps the objects alive for the
// duration of the call. Save and Restore run with the GIL released: the snapshot copies straight
// from the tensors' memory into the staging buffers (no intermediate Python copy), and the
// background writer never needs the GIL.
//
// Errors: every non-OK Status becomes a Python exception of the class for its code
// (muster.InvalidArgumentError is also a ValueError, muster.NotFoundError a LookupError, ...);
// nothing in here may crash the interpreter on bad input.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "checkpoint/adopt.h"
#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpointer.h"
#include "checkpoint/manifest.h"
#include "checkpoint/volume.h"
#include "collectives/rendezvous_client.h"
#include "common/rank_env.h"
#include "common/status.h"
#include "runtime/job_context.h"

namespace py = pybind11;

namespace muster::python {
namespace {

using checkpoint::Checkpointer;
using checkpoint::CheckpointerOptions;
using checkpoint::DType;
using checkpoint::MemoryKind;

// A non-OK Status on its way to the Python exception of its code.
struct StatusException {
  Status status;
};

[[noreturn]] void Throw(const Status& st) { throw StatusException{st}; }

void Check(const Status& st) {
  if (!st.ok()) Throw(st);
}

template <typename T>
T Value(StatusOr<T> v) {
  if (!v.ok()) Throw(v.status());
  return std::move(*v);
}

// The Python exception classes, by StatusCode (index = code). Set once at import.
PyObject* g_errors[9] = {};

PyObject* NewError(py::module_& m, const char* name, PyObject* bases, const char* doc) {
  std::string qualified = std::string("muster.") + name;
  PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  if (!cls) throw py::error_already_set();
  m.add_object(name, py::handle(cls));
  return cls;
}

DType ParseDTypeOrThrow(const std::string& name) { return Value(checkpoint::ParseDType(name)); }

MemoryKind ParseMemory(const std::string& kind) {
  if (kind == "host") return MemoryKind::kHost;
  if (kind == "cuda") return MemoryKind::kCuda;
  Throw(InvalidArgumentError("memory kind '" + kind + "' is not 'host' or 'cuda'"));
}

// The process's JobContext: one store connection for every checkpointer and communicator the
// package makes. Made on first use and never destroyed (a rendezvous client torn down during
// interpreter shutdown could block on its sockets).
runtime::JobContext& Context() {
  static std::mutex mu;
  static runtime::JobContext* ctx = nullptr;
  std::lock_guard<std::mutex> l(mu);
  if (!ctx) ctx = Value(runtime::JobContext::FromEnv()).release();
  return *ctx;
}

// The communicator muster.agree_to_stop() decides over (made by the first call, on every rank).
collectives::Communicator& StopCommunicator() {
  static std::mutex mu;
  static collectives::Communicator* comm = nullptr;
  std::lock_guard<std::mutex> l(mu);
  if (!comm) {
    runtime::JobContext& ctx = Context();
    collectives::CommConfig c;
    c.rank = ctx.rank();
    c.size = ctx.world_size();
    c.name = "muster-py-stop";
    comm = Value(ctx.NewCommunicator(c)).release();
  }
  return *comm;
}

// One tensor of a save, as the Python layer describes it.
struct PyTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<int64_t> offsets;
  std::vector<int64_t> lengths;
  bool replicated = false;
  uintptr_t data = 0;
  std::string memory = "host";
};

py::dict ManifestToDict(const checkpoint::Manifest& m) {
  py::dict d;
  d["step"] = m.step;
  d["world_size"] = m.world_size;
  d["block_size"] = m.block_size;
  d["created_unix_ms"] = m.created_unix_ms;
  py::list shards;
  for (const auto& s : m.shards) {
    py::dict sd;
    sd["rank"] = s.rank;
    sd["file"] = s.file;
    sd["size"] = s.size;
    sd["metadata"] = py::bytes(s.metadata);
    shards.append(sd);
  }
  d["shards"] = shards;
  py::list tensors;
  for (const auto& t : m.tensors) {
    py::dict td;
    td["name"] = t.name;
    td["dtype"] = std::string(checkpoint::DTypeName(t.dtype));
    td["shape"] = t.shape;
    td["replicated"] = t.replicated;
    tensors.append(td);
  }
  d["tensors"] = tensors;
  return d;
}

// The Checkpointer with the store connection it commits through (world size > 1).
class PyCheckpointer {
 public:
  // From the job's context (the env contract, its store, commits announced to the agent);
  // `dir` overrides MUSTER_CHECKPOINT_DIR when not empty.
  PyCheckpointer(const std::string& dir, bool direct_io, int io_threads, bool overlap_snapshot) {
    CheckpointerOptions o;
    o.dir = dir;
    o.store_prefix = "ckpt-py";
    o.direct_io = direct_io;
    o.io_threads = io_threads;
    o.overlap_snapshot = overlap_snapshot;
    ck_ = Value(Context().NewCheckpointer(std::move(o)));
  }

  PyCheckpointer(std::string dir, int rank, int world_size, bool connect_store, bool direct_io,
                 int io_threads, bool overlap_snapshot) {
    if (connect_store) {
      store_ = Value(collectives::ConnectRendezvousFromEnv());
    } else if (world_size > 1) {
      Throw(FailedPreconditionError(
          "checkpointer: world size " + std::to_string(world_size) +
          " needs the job's rendezvous store (MUSTER_RDZV_ENDPOINT): run under `muster run` or "
          "an agent"));
    }
    CheckpointerOptions o;
    o.dir = std::move(dir);
    o.rank = rank;
    o.world_size = world_size;
    o.store = store_.get();
    o.store_prefix = "ckpt-py";
    o.direct_io = direct_io;
    o.io_threads = io_threads;
    o.overlap_snapshot = overlap_snapshot;
    ck_ = Value(Checkpointer::Create(std::move(o)));
  }

  ~PyCheckpointer() {
    // The destructor waits for the in-flight save: never with the GIL held.
    py::gil_scoped_release release;
    ck_.reset();
    store_.reset();
  }

  void Save(int64_t step, const std::vector<PyTensor>& tensors, const py::bytes& metadata) {
    checkpoint::SaveState state;
    state.metadata = std::string(metadata);
    state.tensors.reserve(tensors.size());
    for (const auto& t : tensors) {
      checkpoint::TensorRef r;
      r.name = t.name;
      r.dtype = ParseDTypeOrThrow(t.dtype);
      r.shape = t.shape;
      r.offsets = t.offsets;
      r.lengths = t.lengths;
      r.replicated = t.replicated;
      r.data = reinterpret_cast<const void*>(t.data);
      r.memory = ParseMemory(t.memory);
      if (r.memory == MemoryKind::kCuda && !checkpoint::CudaBuiltIn()) {
        Throw(FailedPreconditionError("save: tensor '" + t.name +
                                      "' is on a GPU but this muster was built without CUDA"));
      }
      state.tensors.push_back(std::move(r));
    }
    Status st;
    {
      py::gil_scoped_release release;
      st = ck_->Save(step, state);
    }
    Check(st);
  }

  void Wait() {
    Status st;
    {
      py::gil_scoped_release release;
      st = ck_->Wait();
    }
    Check(st);
  }

  bool Saving() { return ck_->Saving(); }

  py::object LatestStep() {
    auto v = ck_->LatestStep();
    if (!v.ok() && v.status().code() == StatusCode::kNotFound) return py::none();
    return py::int_(Value(std::move(v)));
  }

  py::dict ReadManifest(int64_t step) {
    StatusOr<checkpoint::Manifest> m = InternalError("unset");
    {
      py::gil_scoped_release release;
      m = ck_->ReadManifest(step);
    }
    return ManifestToDict(Value(std::move(m)));
  }

  // requests: (name, dtype, offsets, lengths, data pointer, memory kind); empty offsets and
  // lengths ask for the whole tensor.
  void Restore(int64_t step, const std::vector<PyTensor>& requests) {
    std::vector<checkpoint::RestoreRequest> rs;
    rs.reserve(requests.size());
    for (const auto& t : requests) {
      checkpoint::RestoreRequest r;
      r.name = t.name;
      r.dtype = ParseDTypeOrThrow(t.dtype);
      r.offsets = t.offsets;
      r.lengths = t.lengths;
      r.data = reinterpret_cast<void*>(t.data);
      r.memory = ParseMemory(t.memory);
      if (r.memory == MemoryKind::kCuda && !checkpoint::CudaBuiltIn()) {
        Throw(FailedPreconditionError("load: tensor '" + t.name +
                                      "' asked on a GPU but this muster was built without CUDA"));
      }
      rs.push_back(std::move(r));
    }
    Status st;
    {
      py::gil_scoped_release release;
      st = ck_->Restore(step, rs);
    }
    Check(st);
  }

  std::string dir() const { return ck_->options().dir; }
  int rank() const { return ck_->options().rank; }
  int world_size() const { return ck_->options().world_size; }

 private:
  std::unique_ptr<collectives::RendezvousClient> store_;
  std::unique_ptr<Checkpointer> ck_;
};

}  // namespace
}  // namespace muster::python

PYBIND11_MODULE(_core, m) {
  using namespace muster;
  using namespace muster::python;
  m.doc() = "muster's C++ core (checkpoints); use the `muster` package, not this module";

  PyObject* base = NewError(m, "Error", PyExc_RuntimeError,
                            "Base class of muster's errors; the message says what is wrong.");
  auto bases = [&](PyObject* extra) {
    return py::make_tuple(py::handle(base), py::handle(extra)).release().ptr();
  };
  PyObject* plain = py::make_tuple(py::handle(base)).release().ptr();
  g_errors[0] = base;
  g_errors[static_cast<int>(StatusCode::kInvalidArgument)] =
      NewError(m, "InvalidArgumentError", bases(PyExc_ValueError), "Bad input (a ValueError).");
  g_errors[static_cast<int>(StatusCode::kNotFound)] =
      NewError(m, "NotFoundError", bases(PyExc_LookupError),
               "A step, tensor or file that does not exist (a LookupError).");
  g_errors[static_cast<int>(StatusCode::kDeadlineExceeded)] =
      NewError(m, "DeadlineExceededError", bases(PyExc_TimeoutError),
               "A wait that ran past its deadline (a TimeoutError).");
  g_errors[static_cast<int>(StatusCode::kUnavailable)] =
      NewError(m, "UnavailableError", plain, "A peer or server that cannot be reached.");
  g_errors[static_cast<int>(StatusCode::kAborted)] =
      NewError(m, "AbortedError", plain, "An operation that was cancelled.");
  g_errors[static_cast<int>(StatusCode::kFailedPrecondition)] =
      NewError(m, "FailedPreconditionError", plain,
               "A call the current state does not allow (e.g. no checkpoint directory).");
  g_errors[static_cast<int>(StatusCode::kDataLoss)] =
      NewError(m, "DataLossError", plain, "Stored bytes that fail their checksum.");
  g_errors[static_cast<int>(StatusCode::kInternal)] =
      NewError(m, "InternalError", plain, "A broken invariant inside muster.");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusException& e) {
      int code = static_cast<int>(e.status.code());
      PyObject* cls = (code > 0 && code < 9 && g_errors[code]) ? g_errors[code] : g_errors[0];
      PyErr_SetString(cls, e.status.message().c_str());
    }
  });

  py::class_<PyTensor>(m, "Tensor")
      .def(py::init<>())
      .def_readwrite("name", &PyTensor::name)
      .def_readwrite("dtype", &PyTensor::dtype)
      .def_readwrite("shape", &PyTensor::shape)
      .def_readwrite("offsets", &PyTensor::offsets)
      .def_readwrite("lengths", &PyTensor::lengths)
      .def_readwrite("replicated", &PyTensor::replicated)
      .def_readwrite("data", &PyTensor::data)
      .def_readwrite("memory", &PyTensor::memory);

  py::class_<PyCheckpointer>(m, "Checkpointer")
      .def(py::init<std::string, int, int, bool, bool, int, bool>(), py::arg("dir"),
           py::arg("rank") = 0, py::arg("world_size") = 1, py::arg("connect_store") = false,
           py::arg("direct_io") = true, py::arg("io_threads") = 4,
           py::arg("overlap_snapshot") = false)
      .def_static(
          "from_context",
          [](const std::string& dir, bool direct_io, int io_threads, bool overlap_snapshot) {
            return std::make_unique<PyCheckpointer>(dir, direct_io, io_threads, overlap_snapshot);
          },
          py::arg("dir") = "", py::arg("direct_io") = true, py::arg("io_threads") = 4,
          py::arg("overlap_snapshot") = false)
      .def("save", &PyCheckpointer::Save, py::arg("step"), py::arg("tensors"),
           py::arg("metadata") = py::bytes())
      .def("wait", &PyCheckpointer::Wait)
      .def("saving", &PyCheckpointer::Saving)
      .def("latest_step", &PyCheckpointer::LatestStep)
      .def("read_manifest", &PyCheckpointer::ReadManifest, py::arg("step"))
      .def("restore", &PyCheckpointer::Restore, py::arg("step"), py::arg("requests"))
      .def_property_readonly("dir", &PyCheckpointer::dir)
      .def_property_readonly("rank", &PyCheckpointer::rank)
      .def_property_readonly("world_size", &PyCheckpointer::world_size);

  m.def(
      "verify_step",
      [](const std::string& dir, int64_t step) {
        Status st;
        {
          py::gil_scoped_release release;
          st = checkpoint::VerifyStep(checkpoint::LocalVolume(), dir, step);
        }
        Check(st);
      },
      py::arg("dir"), py::arg("step"), "Reads every block of `step` and checks its checksum.");
  m.def(
      "adopt",
      [](const std::string& source, const std::string& job_dir, int64_t step) {
        checkpoint::AdoptOptions o;
        o.source = source;
        o.job_dir = job_dir;
        o.step = step;
        StatusOr<checkpoint::AdoptReport> r = InternalError("unset");
        {
          py::gil_scoped_release release;
          r = checkpoint::Adopt(o);
        }
        auto rep = Value(std::move(r));
        py::dict d;
        d["step"] = rep.step;
        d["format"] = rep.format;
        d["files"] = rep.files;
        d["bytes"] = rep.bytes;
        return d;
      },
      py::arg("source"), py::arg("job_dir"), py::arg("step") = -1);
  m.def(
      "extract",
      [](const std::string& job_dir, int64_t step, const std::string& dest) {
        Status st;
        {
          py::gil_scoped_release release;
          st = checkpoint::ExtractAdopted(checkpoint::LocalVolume(), job_dir, step, dest);
        }
        Check(st);
      },
      py::arg("job_dir"), py::arg("step"), py::arg("dest"));
  m.def(
      "latest_committed_step",
      [](const std::string& dir) -> py::object {
        auto v = checkpoint::LatestCommittedStep(checkpoint::LocalVolume(), dir);
        if (!v.ok() && v.status().code() == StatusCode::kNotFound) return py::none();
        return py::int_(Value(std::move(v)));
      },
      py::arg("dir"));
  // The env contract (common/rank_env.h); the store credentials are not exposed.
  py::class_<RankEnv>(m, "RankEnv",
                      "This rank's env contract (docs/env-contract.md), parsed and validated.")
      .def_readonly("rank", &RankEnv::rank)
      .def_readonly("world_size", &RankEnv::world_size)
      .def_readonly("local_rank", &RankEnv::local_rank)
      .def_readonly("local_world_size", &RankEnv::local_world_size)
      .def_readonly("node_rank", &RankEnv::node_rank)
      .def_readonly("nnodes", &RankEnv::nnodes)
      .def_readonly("master_addr", &RankEnv::master_addr)
      .def_readonly("master_port", &RankEnv::master_port)
      .def_readonly("job_id", &RankEnv::job_id)
      .def_readonly("attempt", &RankEnv::attempt)
      .def_readonly("rdzv_endpoint", &RankEnv::rdzv_endpoint)
      .def_readonly("checkpoint_dir", &RankEnv::checkpoint_dir)
      .def_readonly("resume_step", &RankEnv::resume_step)
      .def_readonly("checkpoint_every", &RankEnv::checkpoint_every)
      .def_readonly("checkpoint_every_s", &RankEnv::checkpoint_every_s)
      .def_readonly("preempt_file", &RankEnv::preempt_file)
      .def_readonly("node", &RankEnv::node)
      .def_readonly("provider", &RankEnv::provider)
      .def_readonly("control_fd", &RankEnv::control_fd)
      .def_property_readonly("has_rendezvous", &RankEnv::has_rendezvous)
      .def("__repr__", [](const RankEnv& e) {
        return "<muster.RankEnv rank=" + std::to_string(e.rank) + "/" +
               std::to_string(e.world_size) + " local_rank=" + std::to_string(e.local_rank) +
               " job=" + e.job_id + " attempt=" + std::to_string(e.attempt) +
               " checkpoint_dir=" + e.checkpoint_dir +
               " resume_step=" + (e.resume_step ? std::to_string(*e.resume_step) : "None") + ">";
      });
  m.def(
      "rank_env", [] { return Value(RankEnv::FromProcessEnviron()); },
      "Parses this process's env contract; InvalidArgumentError names a malformed variable.");

  m.def(
      "progress",
      [](int64_t step, int64_t total, double loss,
         const std::vector<std::pair<std::string, double>>& metrics) {
        Check(Context().Progress(step, total, loss, metrics));
      },
      py::arg("step"), py::arg("total") = -1,
      py::arg("loss") = std::numeric_limits<double>::quiet_NaN(),
      py::arg("metrics") = std::vector<std::pair<std::string, double>>{});
  m.def("notice_seen", [] {
    runtime::JobContext& ctx = Context();
    py::gil_scoped_release release;  // rank 0 asks the store
    return ctx.NoticeSeen();
  });
  m.def("notice_reason", [] { return Context().NoticeReason(); });
  m.def("agree_to_stop", [] {
    runtime::JobContext& ctx = Context();
    StatusOr<bool> r = InternalError("unset");
    {
      py::gil_scoped_release release;  // a collective: waits for every rank
      r = ctx.AgreeToStop(StopCommunicator());
    }
    return Value(std::move(r));
  });
  m.def("install_sigterm_handler", &runtime::JobContext::InstallSigtermHandler);

  m.attr("cuda_built_in") = checkpoint::CudaBuiltIn();
}
