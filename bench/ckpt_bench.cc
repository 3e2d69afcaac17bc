// muster-bench ckpt: checkpoint save throughput (Save call to commit), training stall (Save call
// to return), restore and resharded restore (cold cache), each beside its anchor measured in the
// same run on the same directory: a memcpy of the state (a pinned device-to-host copy with
// --device cuda), an O_DIRECT write + fsync of the same size (what `dd oflag=direct
// conv=fsync bs=32M` does) and an O_DIRECT read of that file (`dd iflag=direct bs=32M`). Every
// restore is checked byte for byte against the saved state, outside the timing.

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#ifdef MUSTER_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "bench/bench.h"
#include "checkpoint/checkpointer.h"
#include "collectives/rendezvous_store.h"

namespace muster::bench {
namespace {

using namespace muster::checkpoint;
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Options {
  int ranks = 4;
  std::string size = "1G";
  std::string dir;
  int saves = 3;
  bool keep = false;
  bool json = false;
  std::string device = "cpu";
  int io_threads = 4;
  bool overlap = false;
};

StatusOr<uint64_t> ParseSize(const std::string& s) {
  if (s.empty()) return InvalidArgumentError("--size is empty");
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (const std::exception&) {
    return InvalidArgumentError("--size '" + s + "' is not a size (e.g. 1073741824, 512M, 4G)");
  }
  std::string unit = s.substr(pos);
  uint64_t mult = 1;
  if (unit == "" || unit == "B")
    mult = 1;
  else if (unit == "K" || unit == "KiB")
    mult = 1ull << 10;
  else if (unit == "M" || unit == "MiB")
    mult = 1ull << 20;
  else if (unit == "G" || unit == "GiB")
    mult = 1ull << 30;
  else
    return InvalidArgumentError("--size '" + s + "': unknown unit '" + unit + "'");
  if (v <= 0) return InvalidArgumentError("--size must be positive");
  return static_cast<uint64_t>(v * mult);
}

struct Aligned {
  char* p = nullptr;
  explicit Aligned(size_t n) {
    if (::posix_memalign(reinterpret_cast<void**>(&p), 4096, std::max<size_t>(n, 4096)) != 0)
      p = nullptr;
  }
  ~Aligned() { ::free(p); }
};

void Pattern(char* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
}

// O_DIRECT write + fsync of `n` bytes in 32 MiB requests (dd oflag=direct conv=fsync bs=32M).
StatusOr<double> DiskWrite(const std::string& path, const char* buf, uint64_t n) {
  auto t0 = Clock::now();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0644);
  bool direct = fd >= 0;
  if (fd < 0) fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus(errno, "open " + path);
  const uint64_t chunk = 32 << 20;
  uint64_t n_aligned = (n + 4095) / 4096 * 4096;
  for (uint64_t off = 0; off < n_aligned; off += chunk) {
    uint64_t len = std::min(chunk, n_aligned - off);
    ssize_t w = ::pwrite(fd, buf + off, len, off);
    if (w != static_cast<ssize_t>(len)) {
      ::close(fd);
      return ErrnoStatus(errno, "write " + path);
    }
  }
  if (::fsync(fd) != 0) return ErrnoStatus(errno, "fsync " + path);
  ::close(fd);
  (void)direct;
  return Since(t0);
}

// Cold read: O_DIRECT (dd iflag=direct bs=32M) where the file system allows, else buffered
// after dropping the file's cached pages.
StatusOr<double> DiskRead(const std::string& path, char* buf, uint64_t n) {
  n = (n + 4095) / 4096 * 4096;
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "open " + path);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  auto t0 = Clock::now();
  const uint64_t chunk = 32 << 20;
  for (uint64_t off = 0; off < n; off += chunk) {
    uint64_t len = std::min(chunk, n - off);
    if (::pread(fd, buf + off, len, off) != static_cast<ssize_t>(len)) {
      ::close(fd);
      return ErrnoStatus(errno, "read " + path);
    }
  }
  double t = Since(t0);
  ::close(fd);
  return t;
}

// Memory the ranks' tensors live in: host, or device with --device cuda.
class StateMemory {
 public:
  ~StateMemory() {
    for (void* p : ptrs_) {
#ifdef MUSTER_HAVE_CUDA
      if (cuda_) {
        cudaFree(p);
        continue;
      }
#endif
      ::free(p);
    }
  }
  StatusOr<void*> Alloc(size_t n, bool cuda, uint64_t seed) {
    cuda_ = cuda;
    Aligned host(n);
    if (!host.p) return InternalError("out of memory");
    Pattern(host.p, n, seed);
    if (!cuda) {
      ptrs_.push_back(host.p);
      host.p = nullptr;
      return ptrs_.back();
    }
#ifdef MUSTER_HAVE_CUDA
    void* d = nullptr;
    if (cudaError_t e = cudaMalloc(&d, n); e != cudaSuccess) {
      return InternalError(std::string("cudaMalloc of the state: ") + cudaGetErrorString(e));
    }
    if (cudaMemcpy(d, host.p, n, cudaMemcpyHostToDevice) != cudaSuccess) {
      return InternalError("cudaMemcpy failed");
    }
    ptrs_.push_back(d);
    return d;
#else
    return FailedPreconditionError("--device cuda needs a build with CUDA (MUSTER_WITH_CUDA=ON)");
#endif
  }

 private:
  bool cuda_ = false;
  std::vector<void*> ptrs_;
};

// Compares `n` bytes of `a` and `b` (both host, or both device memory with `cuda`: copied back
// through pinned buffers).
StatusOr<bool> SameBytes(const char* a, const char* b, uint64_t n, bool cuda) {
  if (!cuda) return std::memcmp(a, b, n) == 0;
#ifdef MUSTER_HAVE_CUDA
  constexpr uint64_t kChunk = 64 << 20;
  void* ha = nullptr;
  void* hb = nullptr;
  if (cudaHostAlloc(&ha, kChunk, cudaHostAllocDefault) != cudaSuccess ||
      cudaHostAlloc(&hb, kChunk, cudaHostAllocDefault) != cudaSuccess) {
    if (ha) cudaFreeHost(ha);
    return InternalError("cudaHostAlloc for the restore check failed");
  }
  bool same = true;
  Status st;
  for (uint64_t off = 0; off < n && same && st.ok(); off += kChunk) {
    const uint64_t len = std::min(kChunk, n - off);
    if (cudaMemcpy(ha, a + off, len, cudaMemcpyDeviceToHost) != cudaSuccess ||
        cudaMemcpy(hb, b + off, len, cudaMemcpyDeviceToHost) != cudaSuccess) {
      st = InternalError("cudaMemcpy for the restore check failed");
    } else {
      same = std::memcmp(ha, hb, len) == 0;
    }
  }
  cudaFreeHost(ha);
  cudaFreeHost(hb);
  if (!st.ok()) return st;
  return same;
#else
  return FailedPreconditionError("--device cuda needs a build with CUDA");
#endif
}

// Runs `fn(rank)` on `n` threads and returns the wall time of the slowest.
template <typename F>
double OnRanks(int n, F fn) {
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r) ts.emplace_back([&, r] { fn(r); });
  for (auto& t : ts) t.join();
  return Since(t0);
}

int Run(const Options& o) {
  auto size_or = ParseSize(o.size);
  if (!size_or.ok()) {
    std::cerr << "ckpt: " << size_or.status().message() << "\n";
    return 2;
  }
  if (o.ranks < 1 || o.ranks > 1024) {
    std::cerr << "ckpt: --ranks must be between 1 and 1024\n";
    return 2;
  }
  if (o.saves < 1) {
    std::cerr << "ckpt: --saves must be at least 1\n";
    return 2;
  }
  const bool cuda = o.device == "cuda";
  if (!cuda && o.device != "cpu") {
    std::cerr << "ckpt: --device must be cpu or cuda\n";
    return 2;
  }
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(o.dir) && !fs::is_empty(o.dir, ec)) {
    std::cerr << "ckpt: --dir " << o.dir
              << " exists and is not empty; give a new or empty directory (it is removed "
                 "afterwards unless --keep)\n";
    return 2;
  }
  fs::create_directories(o.dir, ec);
  if (ec) {
    std::cerr << "ckpt: cannot create " << o.dir << ": " << ec.message() << "\n";
    return 2;
  }
  const uint64_t per = (*size_or / o.ranks + 4095) / 4096 * 4096;
  const uint64_t total = per * o.ranks;
  const MemoryKind kind = cuda ? MemoryKind::kCuda : MemoryKind::kHost;

  auto fail = [&](const Status& st) {
    std::cerr << "ckpt: " << st.ToString() << "\n";
    if (!o.keep) fs::remove_all(o.dir, ec);
    return 1;
  };

  StateMemory mem;
  std::vector<void*> state(o.ranks);
  for (int r = 0; r < o.ranks; ++r) {
    auto p = mem.Alloc(per, cuda, r + 1);
    if (!p.ok()) return fail(p.status());
    state[r] = *p;
  }

  // Anchor 1: a copy of the whole state into (pre-faulted) host memory.
  double memcpy_s = 0;
  {
    Aligned dst(total);
    std::memset(dst.p, 0, total);
    if (!cuda) {
      auto t0 = Clock::now();
      for (int r = 0; r < o.ranks; ++r) std::memcpy(dst.p + r * per, state[r], per);
      memcpy_s = Since(t0);
    } else {
#ifdef MUSTER_HAVE_CUDA
      void* pinned = nullptr;
      if (cudaHostAlloc(&pinned, total, cudaHostAllocDefault) != cudaSuccess) {
        return fail(InternalError("cudaHostAlloc failed"));
      }
      std::memset(pinned, 0, total);
      auto t0 = Clock::now();
      for (int r = 0; r < o.ranks; ++r) {
        cudaMemcpy(static_cast<char*>(pinned) + r * per, state[r], per, cudaMemcpyDeviceToHost);
      }
      memcpy_s = Since(t0);
      cudaFreeHost(pinned);
#endif
    }
  }

  // Anchors 2 and 3: the disk's write and cold read speed on the same directory.
  double disk_write_s = 0, disk_read_s = 0;
  {
    Aligned buf(total);
    Pattern(buf.p, total, 99);
    const std::string path = o.dir + "/anchor.bin";
    auto w = DiskWrite(path, buf.p, total);
    if (!w.ok()) return fail(w.status());
    disk_write_s = *w;
    auto rd = DiskRead(path, buf.p, total);
    if (!rd.ok()) return fail(rd.status());
    disk_read_s = *rd;
    fs::remove(path, ec);
  }

  // Saves: every rank calls Save at once; stall is the slowest rank's Save call, save time runs
  // from the calls to the commit seen by every rank.
  const std::string ckdir = o.dir + "/job";
  auto store = collectives::NewInMemoryRendezvousStore();
  std::vector<std::unique_ptr<Checkpointer>> cks(o.ranks);
  for (int r = 0; r < o.ranks; ++r) {
    CheckpointerOptions co;
    co.dir = ckdir;
    co.rank = r;
    co.world_size = o.ranks;
    co.store = store.get();
    co.io_threads = o.io_threads;
    co.overlap_snapshot = o.overlap;
    auto ck = Checkpointer::Create(co);
    if (!ck.ok()) return fail(ck.status());
    cks[r] = std::move(*ck);
  }
  std::vector<double> stalls, saves;
  for (int i = 1; i <= o.saves; ++i) {
    std::vector<double> stall(o.ranks);
    std::vector<Status> st(o.ranks);
    double t = OnRanks(o.ranks, [&](int r) {
      SaveState s;
      s.tensors.push_back(TensorRef::RowShard("state", DType::kU8, {static_cast<int64_t>(total)},
                                              r * per, per, state[r], kind));
      auto t0 = Clock::now();
      st[r] = cks[r]->Save(i, s);
      stall[r] = Since(t0);
      if (st[r].ok()) st[r] = cks[r]->Wait();
    });
    for (const auto& s : st)
      if (!s.ok()) return fail(s);
    stalls.push_back(*std::max_element(stall.begin(), stall.end()));
    saves.push_back(t);
  }
  // The first save allocates and faults in the staging memory; later ones reuse it.
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double first_stall = stalls.front();
  std::vector<double> steady_stalls(stalls.begin() + (stalls.size() > 1 ? 1 : 0), stalls.end());
  const double stall_s = median(steady_stalls);
  const double save_s = median(saves);
  const int64_t step = o.saves;

  // Restores, cold: same world size, then resharded to another world size.
  auto restore = [&](int world) -> StatusOr<double> {
    MUSTER_RETURN_IF_ERROR(DropStepCache(LocalVolume(), ckdir, step));
    const uint64_t base = total / world;
    std::vector<Status> st(world);
    StateMemory dst;
    std::vector<void*> bufs(world);
    for (int r = 0; r < world; ++r) {
      uint64_t n = r == world - 1 ? total - base * r : base;
      MUSTER_ASSIGN_OR_RETURN(bufs[r], dst.Alloc(n, cuda, 7));
    }
    double t = OnRanks(world, [&](int r) {
      CheckpointerOptions co;
      co.dir = ckdir;
      co.io_threads = o.io_threads;
      auto ck = Checkpointer::Create(co);
      if (!ck.ok()) {
        st[r] = ck.status();
        return;
      }
      uint64_t n = r == world - 1 ? total - base * r : base;
      st[r] = (*ck)->Restore(
          step, {RestoreRequest::RowShard("state", DType::kU8, {static_cast<int64_t>(total)},
                                          base * r, n, bufs[r], kind)});
    });
    for (const auto& s : st) MUSTER_RETURN_IF_ERROR(s);
    // Check every restored byte against the saved state (outside the timing).
    for (int r = 0; r < world; ++r) {
      uint64_t begin = base * r, n = r == world - 1 ? total - base * r : base;
      for (uint64_t off = begin; off < begin + n;) {
        uint64_t src_rank = off / per, in = off % per;
        uint64_t len = std::min(per - in, begin + n - off);
        MUSTER_ASSIGN_OR_RETURN(bool same,
                                SameBytes(static_cast<char*>(bufs[r]) + (off - begin),
                                          static_cast<char*>(state[src_rank]) + in, len, cuda));
        if (!same) {
          return DataLossError("restored bytes at offset " + std::to_string(off) +
                               " differ from the saved state (restore to " + std::to_string(world) +
                               " ranks)");
        }
        off += len;
      }
    }
    return t;
  };
  const int reshard_world = o.ranks > 1 ? o.ranks - 1 : 2;
  auto restore_same = restore(o.ranks);
  if (!restore_same.ok()) return fail(restore_same.status());
  auto restore_resharded = restore(reshard_world);
  if (!restore_resharded.ok()) return fail(restore_resharded.status());

  const double gb = total / 1e9;
  const double save_gbps = gb / save_s, disk_write_gbps = gb / disk_write_s;
  const double restore_gbps = gb / *restore_same, disk_read_gbps = gb / disk_read_s;
  const double resharded_gbps = gb / *restore_resharded;
  if (!o.keep) fs::remove_all(o.dir, ec);

  if (o.json) {
    nlohmann::json j = {{"ranks", o.ranks},
                        {"bytes", total},
                        {"device", o.device},
                        {"saves", o.saves},
                        {"overlap_snapshot", o.overlap},
                        {"io_threads", o.io_threads},
                        {"save_gbps", save_gbps},
                        {"stall_s", stall_s},
                        {"first_stall_s", first_stall},
                        {"memcpy_s", memcpy_s},
                        {"restore_gbps", restore_gbps},
                        {"resharded_restore_gbps", resharded_gbps},
                        {"resharded_world", reshard_world},
                        {"disk_write_gbps", disk_write_gbps},
                        {"disk_read_gbps", disk_read_gbps}};
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::cout << "checkpoint of " << Fmt(total / double(1 << 20), 0) << " MiB, " << o.ranks
            << " ranks (threads), " << o.device << " tensors, " << o.saves << " saves, "
            << (o.overlap ? "snapshot overlapped with writing" : "write after snapshot") << ", dir "
            << o.dir << "\n";
  const std::string copy_name =
      cuda ? "pinned device-to-host copy (anchor)" : "memcpy of the state (anchor)";
  Table t({"measure", "seconds", "GB/s", "vs anchor"});
  t.Row({copy_name, Fmt(memcpy_s, 3), Fmt(gb / memcpy_s), ""});
  t.Row({"Save() stall (median, warm staging)", Fmt(stall_s, 3), Fmt(gb / stall_s),
         Fmt(stall_s / memcpy_s) + "x time"});
  t.Row({"Save() stall, first save (allocates)", Fmt(first_stall, 3), Fmt(gb / first_stall), ""});
  t.Row(
      {"O_DIRECT write + fsync, bs=32M (anchor)", Fmt(disk_write_s, 3), Fmt(disk_write_gbps), ""});
  t.Row({"save: Save() to commit (median)", Fmt(save_s, 3), Fmt(save_gbps),
         Fmt(save_gbps / disk_write_gbps) + "x speed"});
  t.Row({"O_DIRECT read, bs=32M (anchor)", Fmt(disk_read_s, 3), Fmt(disk_read_gbps), ""});
  t.Row({"restore, " + std::to_string(o.ranks) + " ranks, cold", Fmt(*restore_same, 3),
         Fmt(restore_gbps), Fmt(restore_gbps / disk_read_gbps) + "x speed"});
  t.Row({"restore resharded to " + std::to_string(reshard_world) + " ranks, cold",
         Fmt(*restore_resharded, 3), Fmt(resharded_gbps),
         Fmt(resharded_gbps / disk_read_gbps) + "x speed"});
  t.Print();
  return 0;
}

}  // namespace

void AddCkptBench(CLI::App& app, Runner* runner) {
  auto* cmd = app.add_subcommand(
      "ckpt", "Checkpoint save/stall/restore beside dd-style disk I/O and memcpy");
  auto o = std::make_shared<Options>();
  o->dir = (std::filesystem::temp_directory_path() / "muster-bench-ckpt").string();
  cmd->add_option("--ranks", o->ranks, "Ranks (threads), each holding size/ranks bytes");
  cmd->add_option("--size", o->size, "Total state size: bytes, or with K/M/G (default 1G)");
  cmd->add_option("--dir", o->dir, "The job's checkpoint directory (new or empty)");
  cmd->add_option("--saves", o->saves, "Number of saves (default 3)");
  cmd->add_flag("--keep", o->keep, "Keep DIR afterwards");
  cmd->add_flag("--json", o->json, "Print JSON");
  cmd->add_option("--io-threads", o->io_threads, "Writer/reader threads per rank (default 4)");
  cmd->add_flag("--overlap", o->overlap,
                "Write chunks while the snapshot is still copying "
                "(CheckpointerOptions::overlap_snapshot)");
  cmd->add_option("--device", o->device, "cpu (default) or cuda: where the state lives");
  cmd->callback([=] { *runner = [=] { return Run(*o); }; });
}

}  // namespace muster::bench
