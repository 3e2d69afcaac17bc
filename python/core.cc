// muster._core: the pybind11 module under the `muster` Python package (python/muster/).
//
// It exposes the C++ Checkpointer with a flat, pointer-level interface: the Python layer
// (python/muster/checkpoint.py) walks the user's nested state, turns each tensor or array into
// (name, dtype, shape, box, data pointer, memory kind) and keeps the objects alive for the
// duration of the call. Save and Restore run with the GIL released: the snapshot copies straight
// from the tensors' memory into the staging buffers (no intermediate Python copy), and the
// background writer never needs the GIL. The same descriptions feed the in-memory snapshots
// (SnapshotSender, SnapshotPayload: checkpoint/snapshot_channel.h and snapshot_state.h, under
// python/muster/snapshot.py), whose copy also runs without the GIL.
//
// Errors: every non-OK Status becomes a Python exception of the class for its code
// (muster.InvalidArgumentError is also a ValueError, muster.NotFoundError a LookupError, ...);
// nothing in here may crash the interpreter on bad input.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
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
#include "checkpoint/snapshot_channel.h"
#include "checkpoint/snapshot_frame.h"
#include "checkpoint/snapshot_state.h"
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

// The state of a save or a snapshot: `tensors`' memory stays the caller's (Python keeps the
// objects alive for the call).
checkpoint::SaveState ToSaveState(const std::vector<PyTensor>& tensors, const py::bytes& metadata) {
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
  return state;
}

// Restore requests from the Python layer's descriptions (`what`: "load", "snapshot restore").
std::vector<checkpoint::RestoreRequest> ToRequests(const std::vector<PyTensor>& requests,
                                                   const std::string& what) {
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
      Throw(FailedPreconditionError(what + ": tensor '" + t.name +
                                    "' asked on a GPU but this muster was built without CUDA"));
    }
    rs.push_back(std::move(r));
  }
  return rs;
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
    checkpoint::SaveState state = ToSaveState(tensors, metadata);
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
    std::vector<checkpoint::RestoreRequest> rs = ToRequests(requests, "load");
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

// The key of this rank's snapshots, checked as a frame's would be (InvalidArgument names the
// field), so a bad env fails at construction, not on the sender's thread.
checkpoint::SnapshotKey SnapshotKeyOrThrow(const std::string& job, int attempt, int rank,
                                           int world_size, int64_t step) {
  checkpoint::SnapshotKey key{
      .job = job, .attempt = attempt, .rank = rank, .world_size = world_size, .step = step};
  Value(checkpoint::EncodeSnapshotPrefix(key, ""));
  return key;
}

// A rank's in-memory snapshots to its node's agent (checkpoint::SnapshotSender): snapshot()
// copies the state into the sender's reused buffer with the GIL released and returns; the
// checksum and the send to the agent run on the sender's own thread. snapshot_in_place() copies
// nothing: the agent reads the tensors out of this process until release(), and this object
// holds them (and so keeps them alive) until then, its destructor included.
class PySnapshotSender {
 public:
  PySnapshotSender(const std::string& socket_path, const std::string& job, int attempt, int rank,
                   int world_size) {
    if (socket_path.empty()) {
      Throw(FailedPreconditionError(
          "snapshots: no snapshot socket (MUSTER_SNAPSHOT_SOCKET): the job or its agent has no "
          "in-memory snapshots"));
    }
    checkpoint::SnapshotSenderOptions o;
    o.socket_path = socket_path;
    o.key = SnapshotKeyOrThrow(job, attempt, rank, world_size, 0);
    sender_ = checkpoint::SnapshotSender::Create(std::move(o));
  }
  ~PySnapshotSender() {
    {
      py::gil_scoped_release release;
      // An in-place snapshot still held: the agent stops reading (or finishes) before the
      // tensors it reads may go, with held_ below.
      if (!held_.is_none()) (void)sender_->Release(kReleaseTimeout);
      sender_.reset();  // joins the sender's thread (a send in progress)
    }
    held_ = py::none();
  }

  void Snapshot(int64_t step, const std::vector<PyTensor>& tensors, const py::bytes& metadata) {
    Take(step, tensors, metadata, /*in_place=*/false);
  }

  // The agent reads `tensors` out of this process while the caller goes on (the sender's
  // in-place snapshot); `keep` holds the objects they point into, here, until Release. The
  // previous one must have been released.
  void SnapshotInPlace(int64_t step, const std::vector<PyTensor>& tensors,
                       const py::bytes& metadata, py::object keep) {
    Take(step, tensors, metadata, /*in_place=*/true);
    held_ = std::move(keep);
  }

  // Waits until the in-place snapshot no longer needs its tensors (the agent read them, or they
  // were copied), at most `timeout_s`; then gives it up (the agent keeps nothing of it). Returns
  // "" when it was taken in time, else why it was given up (training goes on either way).
  std::string Release(double timeout_s) {
    if (!(timeout_s >= 0) || timeout_s > 86400) {
      Throw(InvalidArgumentError("snapshot release: timeout must be in [0, 86400] s"));
    }
    if (held_.is_none()) return "";
    Status st;
    {
      py::gil_scoped_release release;
      st = sender_->Release(std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    }
    held_ = py::none();
    return st.ok() ? "" : st.ToString();
  }

  bool held() const { return !held_.is_none(); }
  bool in_place() const { return sender_->in_place(); }

  void Flush(double timeout_s) {
    if (!(timeout_s >= 0) || timeout_s > 86400) {
      Throw(InvalidArgumentError("snapshot flush: timeout must be in [0, 86400] s"));
    }
    Status st;
    {
      py::gil_scoped_release release;
      st = sender_->Flush(std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    }
    Check(st);
  }

  int64_t sent() const { return sender_->sent(); }
  int64_t replaced() const { return sender_->replaced(); }

 private:
  void Take(int64_t step, const std::vector<PyTensor>& tensors, const py::bytes& metadata,
            bool in_place) {
    if (!held_.is_none()) {
      Throw(FailedPreconditionError("snapshot: the previous in-place snapshot was not released"));
    }
    checkpoint::SaveState state = ToSaveState(tensors, metadata);
    Status st;
    {
      py::gil_scoped_release release;
      st = in_place ? sender_->SnapshotInPlace(step, state) : sender_->Snapshot(step, state);
    }
    Check(st);
  }

  static constexpr std::chrono::milliseconds kReleaseTimeout{10000};
  std::unique_ptr<checkpoint::SnapshotSender> sender_;
  py::object held_ = py::none();  // what an in-place snapshot's tensors point into
};

// One snapshot payload (checkpoint/snapshot_state.h) held on the C++ side: fetched from the
// agent, or given as bytes (tools, tests). Every method checks the payload before using it.
class PySnapshotPayload {
 public:
  explicit PySnapshotPayload(std::string payload) : payload_(std::move(payload)) {}

  // The saved metadata; DataLoss for a malformed payload.
  py::bytes Metadata() const {
    std::string meta;
    Status st;
    {
      py::gil_scoped_release release;
      st = checkpoint::ReadSnapshotIndex(payload_, &meta).status();
    }
    Check(st);
    return py::bytes(meta);
  }

  // The tensors it holds, by name: {"dtype", "shape", "offsets", "lengths", "replicated",
  // "bytes"} (checkpoint::ReadSnapshotIndex; DataLoss for a malformed payload).
  py::dict Tensors() const {
    StatusOr<std::vector<checkpoint::SnapshotTensorInfo>> index = InternalError("unset");
    {
      py::gil_scoped_release release;
      index = checkpoint::ReadSnapshotIndex(payload_);
    }
    py::dict out;
    for (const auto& t : Value(std::move(index))) {
      py::dict d;
      d["dtype"] = std::string(checkpoint::DTypeName(t.dtype));
      d["shape"] = t.shape;
      d["offsets"] = t.offsets;
      d["lengths"] = t.lengths;
      d["replicated"] = t.replicated;
      d["bytes"] = t.bytes;
      out[py::str(t.name)] = d;
    }
    return out;
  }

  // Copies the requested tensors (checkpoint::RestoreSnapshotState: all checked before any
  // byte is copied).
  void Restore(const std::vector<PyTensor>& requests) const {
    std::vector<checkpoint::RestoreRequest> rs = ToRequests(requests, "snapshot restore");
    Status st;
    {
      py::gil_scoped_release release;
      st = checkpoint::RestoreSnapshotState(payload_, rs);
    }
    Check(st);
  }

  size_t size() const { return payload_.size(); }
  py::bytes bytes() const { return py::bytes(payload_); }

 private:
  std::string payload_;
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
      .def_readonly("snapshot_every", &RankEnv::snapshot_every)
      .def_readonly("snapshot_socket", &RankEnv::snapshot_socket)
      .def_readonly("resume_snapshot_step", &RankEnv::resume_snapshot_step)
      .def_readonly("resume_snapshot_attempt", &RankEnv::resume_snapshot_attempt)
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
  // In-memory snapshots (checkpoint/snapshot_channel.h); python/muster/snapshot.py is the API.
  py::class_<PySnapshotSender>(m, "SnapshotSender")
      .def(py::init<std::string, std::string, int, int, int>(), py::arg("socket_path"),
           py::arg("job"), py::arg("attempt"), py::arg("rank"), py::arg("world_size"))
      .def("snapshot", &PySnapshotSender::Snapshot, py::arg("step"), py::arg("tensors"),
           py::arg("metadata") = py::bytes())
      .def("snapshot_in_place", &PySnapshotSender::SnapshotInPlace, py::arg("step"),
           py::arg("tensors"), py::arg("metadata"), py::arg("keep"))
      .def("release", &PySnapshotSender::Release, py::arg("timeout_s"))
      .def_property_readonly("held", &PySnapshotSender::held)
      .def_property_readonly("in_place", &PySnapshotSender::in_place)
      .def("flush", &PySnapshotSender::Flush, py::arg("timeout_s"))
      .def_property_readonly("sent", &PySnapshotSender::sent)
      .def_property_readonly("replaced", &PySnapshotSender::replaced);
  py::class_<PySnapshotPayload>(m, "SnapshotPayload")
      .def(py::init([](const py::bytes& b) {
             return std::make_unique<PySnapshotPayload>(std::string(b));
           }),
           py::arg("payload"))
      .def("metadata", &PySnapshotPayload::Metadata)
      .def("tensors", &PySnapshotPayload::Tensors)
      .def("restore", &PySnapshotPayload::Restore, py::arg("requests"))
      .def("bytes", &PySnapshotPayload::bytes)
      .def("__len__", &PySnapshotPayload::size);
  m.def(
      "encode_snapshot_state",
      [](const std::vector<PyTensor>& tensors, const py::bytes& metadata) {
        checkpoint::SaveState state = ToSaveState(tensors, metadata);
        StatusOr<std::string> out = InternalError("unset");
        {
          py::gil_scoped_release release;
          out = checkpoint::EncodeSnapshotState(state);
        }
        return py::bytes(Value(std::move(out)));
      },
      py::arg("tensors"), py::arg("metadata") = py::bytes(),
      "The snapshot payload of a state (checkpoint::EncodeSnapshotState).");
  m.def(
      "fetch_snapshot",
      [](const std::string& socket_path, const std::string& job, int attempt, int rank,
         int world_size, int64_t step) {
        checkpoint::SnapshotKey key = SnapshotKeyOrThrow(job, attempt, rank, world_size, step);
        StatusOr<checkpoint::SnapshotFrame> f = InternalError("unset");
        {
          py::gil_scoped_release release;
          auto client = checkpoint::SnapshotClient::Connect(socket_path);
          f = client.ok() ? (*client)->Get(key, runtime::JobContext::kMaxSnapshotFetchBytes)
                          : StatusOr<checkpoint::SnapshotFrame>(client.status());
        }
        if (!f.ok()) {
          Throw(f.status().WithContext("the snapshot of step " + std::to_string(step) +
                                       " of attempt " + std::to_string(attempt) + " (rank " +
                                       std::to_string(rank) + ")"));
        }
        return std::make_unique<PySnapshotPayload>(std::move(f->payload));
      },
      py::arg("socket_path"), py::arg("job"), py::arg("attempt"), py::arg("rank"),
      py::arg("world_size"), py::arg("step"),
      "This rank's snapshot as the agent at `socket_path` holds it (its xxh3 checked).");
  m.def(
      "put_snapshot",
      [](const std::string& socket_path, const std::string& job, int attempt, int rank,
         int world_size, int64_t step, const py::bytes& payload) {
        checkpoint::SnapshotKey key = SnapshotKeyOrThrow(job, attempt, rank, world_size, step);
        std::string bytes(payload);
        Status st;
        {
          py::gil_scoped_release release;
          auto client = checkpoint::SnapshotClient::Connect(socket_path);
          st = client.ok() ? (*client)->Put(key, bytes) : client.status();
        }
        Check(st);
      },
      py::arg("socket_path"), py::arg("job"), py::arg("attempt"), py::arg("rank"),
      py::arg("world_size"), py::arg("step"), py::arg("payload"),
      "Hands `payload` to the agent as one frame and waits for its answer (tools, tests).");

  m.attr("cuda_built_in") = checkpoint::CudaBuiltIn();
}
