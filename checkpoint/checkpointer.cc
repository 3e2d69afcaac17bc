#include "checkpoint/checkpointer.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "checkpoint/restore_pipeline.h"
#include "common/control_channel.h"
#include "common/logging.h"

namespace muster::checkpoint {

namespace {

using Clock = std::chrono::steady_clock;

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

std::string StepStr(int64_t step) { return "step " + std::to_string(step); }

constexpr char kErrorPrefix[] = "error:";

// A box [off, off + len) in global coordinates.
struct Box {
  std::vector<int64_t> off, len;
};

bool Intersect(const Box& a, const Box& b, Box* out) {
  out->off.resize(a.off.size());
  out->len.resize(a.off.size());
  for (size_t d = 0; d < a.off.size(); ++d) {
    int64_t lo = std::max(a.off[d], b.off[d]);
    int64_t hi = std::min(a.off[d] + a.len[d], b.off[d] + b.len[d]);
    if (hi <= lo) return false;
    out->off[d] = lo;
    out->len[d] = hi - lo;
  }
  return true;
}

// Row-major linear index of global point `p` within box `b`.
int64_t LinearIn(const Box& b, const std::vector<int64_t>& p) {
  int64_t idx = 0;
  for (size_t d = 0; d < b.off.size(); ++d) idx = idx * b.len[d] + (p[d] - b.off[d]);
  return idx;
}

// True if the elements of `inner` form one contiguous run in `outer`'s row-major layout.
bool ContiguousIn(const Box& inner, const Box& outer) {
  int j = -1;
  for (int d = static_cast<int>(inner.len.size()) - 1; d >= 0; --d) {
    if (inner.len[d] != outer.len[d]) {
      j = d;
      break;
    }
  }
  for (int d = 0; d < j; ++d)
    if (inner.len[d] != 1) return false;
  return true;
}

Status ValidateBox(const std::string& what, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& off, const std::vector<int64_t>& len) {
  if (off.size() != shape.size() || len.size() != shape.size()) {
    return InvalidArgumentError(what + ": slice has " + std::to_string(off.size()) +
                                " offsets and " + std::to_string(len.size()) +
                                " lengths for a tensor of rank " + std::to_string(shape.size()));
  }
  for (size_t d = 0; d < shape.size(); ++d) {
    // off <= shape and len <= shape - off: no overflow on the way.
    if (off[d] < 0 || len[d] < 0 || off[d] > shape[d] || len[d] > shape[d] - off[d]) {
      return InvalidArgumentError(what + ": slice [" + std::to_string(off[d]) + ", +" +
                                  std::to_string(len[d]) + ") of dimension " + std::to_string(d) +
                                  " is outside its size " + std::to_string(shape[d]));
    }
  }
  return Status::Ok();
}

// The box of rows [row_offset, row_offset + rows) of a tensor of `shape`, whole in every other
// dimension.
void RowBox(const std::vector<int64_t>& shape, int64_t row_offset, int64_t rows,
            std::vector<int64_t>* offsets, std::vector<int64_t>* lengths) {
  offsets->assign(shape.size(), 0);
  *lengths = shape;
  if (!shape.empty()) {
    (*offsets)[0] = row_offset;
    (*lengths)[0] = rows;
  }
}

}  // namespace

TensorRef TensorRef::Replicated(std::string name, DType dtype, std::vector<int64_t> shape,
                                const void* data, MemoryKind memory) {
  TensorRef t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.replicated = true;
  t.data = data;
  t.memory = memory;
  return t;
}

TensorRef TensorRef::RowShard(std::string name, DType dtype, std::vector<int64_t> shape,
                              int64_t row_offset, int64_t rows, const void* data,
                              MemoryKind memory) {
  TensorRef t;
  t.name = std::move(name);
  t.dtype = dtype;
  RowBox(shape, row_offset, rows, &t.offsets, &t.lengths);
  t.shape = std::move(shape);
  t.data = data;
  t.memory = memory;
  return t;
}

RestoreRequest RestoreRequest::Whole(std::string name, DType dtype, void* data, MemoryKind memory) {
  RestoreRequest r;
  r.name = std::move(name);
  r.dtype = dtype;
  r.data = data;
  r.memory = memory;
  return r;
}

RestoreRequest RestoreRequest::Whole(std::string name, DType dtype, void* data, uint64_t capacity,
                                     MemoryKind memory) {
  RestoreRequest r = Whole(std::move(name), dtype, data, memory);
  r.capacity = capacity;
  return r;
}

Status CheckRestoreCapacity(const RestoreRequest& req, bool whole, uint64_t bytes,
                            const std::string& what) {
  if (req.capacity == 0) return Status::Ok();
  if (whole ? bytes != req.capacity : bytes > req.capacity) {
    return InvalidArgumentError(fmt::format(
        "{} holds {} bytes, the destination {} bytes{}", what, bytes, req.capacity,
        whole ? " (a whole-tensor restore needs the same size: did the model change?)" : ""));
  }
  return Status::Ok();
}

RestoreRequest RestoreRequest::RowShard(std::string name, DType dtype, std::vector<int64_t> shape,
                                        int64_t row_offset, int64_t rows, void* data,
                                        MemoryKind memory) {
  RestoreRequest r;
  r.name = std::move(name);
  r.dtype = dtype;
  RowBox(shape, row_offset, rows, &r.offsets, &r.lengths);
  r.data = data;
  r.memory = memory;
  return r;
}

struct Checkpointer::Piece {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape, offsets, lengths;
  bool replicated;
  uint64_t staging_offset;
  uint64_t bytes;
};

struct Checkpointer::Job {
  int64_t step;
  int64_t seq;
  std::chrono::steady_clock::time_point started;  // Save was called (and the writer was free)
  std::vector<Piece> pieces;
  std::string metadata;
  uint64_t total;

  // The snapshot runs on the Save caller's thread while the writers already write what it has
  // copied: staging bytes [0, ready) are final. `snapshot_error` ends the job.
  std::mutex snap_mu;
  std::condition_variable snap_cv;
  uint64_t ready = 0;     // GUARDED_BY(snap_mu)
  Status snapshot_error;  // GUARDED_BY(snap_mu)

  void Publish(uint64_t upto) {
    {
      std::lock_guard<std::mutex> l(snap_mu);
      ready = upto;
    }
    snap_cv.notify_all();
  }
  void Fail(const Status& st) {
    {
      std::lock_guard<std::mutex> l(snap_mu);
      snapshot_error = st;
    }
    snap_cv.notify_all();
  }
  // Waits until staging bytes [0, upto) are final; returns the snapshot's error if it failed.
  Status AwaitReady(uint64_t upto) {
    std::unique_lock<std::mutex> l(snap_mu);
    snap_cv.wait(l, [&] { return ready >= upto || !snapshot_error.ok(); });
    if (!snapshot_error.ok()) return AbortedError("snapshot failed: " + snapshot_error.ToString());
    return Status::Ok();
  }
};

Checkpointer::Checkpointer(CheckpointerOptions options)
    : options_(std::move(options)), volume_(options_.volume ? options_.volume : LocalVolume()) {
  worker_ = std::thread([this] { WorkerLoop(); });
}

Checkpointer::~Checkpointer() {
  {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !busy_; });
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

StatusOr<std::unique_ptr<Checkpointer>> Checkpointer::Create(CheckpointerOptions o) {
  if (o.dir.empty()) return InvalidArgumentError("checkpointer: the checkpoint dir is empty");
  if (o.world_size < 1) return InvalidArgumentError("checkpointer: world_size must be >= 1");
  if (o.rank < 0 || o.rank >= o.world_size) {
    return InvalidArgumentError("checkpointer: rank " + std::to_string(o.rank) +
                                " is outside world size " + std::to_string(o.world_size));
  }
  if (o.world_size > 1 && !o.store) {
    return FailedPreconditionError(
        "checkpointer: world size " + std::to_string(o.world_size) +
        " needs the rendezvous store to commit (pass CheckpointerOptions::store)");
  }
  if (o.block_size == 0 || o.block_size % kDirectIoAlignment != 0) {
    return InvalidArgumentError("checkpointer: block_size must be a positive multiple of 4096");
  }
  if (o.io_threads < 1) o.io_threads = 1;
  o.write_chunk = std::max(o.block_size, o.write_chunk / o.block_size * o.block_size);
  Volume* v = o.volume ? o.volume : LocalVolume();
  // DIR and any missing parents it creates are made durable in their parents: the commit's own
  // fsyncs cover only what is inside DIR, so a power loss could otherwise take a fresh DIR away.
  std::vector<std::filesystem::path> created;  // innermost first
  std::filesystem::path p = std::filesystem::path(o.dir).lexically_normal();
  if (p.has_filename() == false && p.has_parent_path()) p = p.parent_path();  // "a/b/" -> "a/b"
  for (; !p.empty() && p != p.root_path() && !v->Exists(p.string()); p = p.parent_path()) {
    created.push_back(p);
  }
  MUSTER_RETURN_IF_ERROR(v->CreateDirs(o.dir));
  for (const auto& d : created) {
    std::filesystem::path parent = d.has_parent_path() ? d.parent_path() : ".";
    MUSTER_RETURN_IF_ERROR(v->SyncDir(parent.string()));
  }
  return std::unique_ptr<Checkpointer>(new Checkpointer(std::move(o)));
}

StatusOr<std::unique_ptr<Checkpointer>> Checkpointer::FromEnv(collectives::RendezvousStore* store,
                                                              CheckpointerOptions base) {
  MUSTER_ASSIGN_OR_RETURN(RankEnv env, RankEnv::FromProcessEnviron());
  return FromEnv(env, store, std::move(base));
}

StatusOr<std::unique_ptr<Checkpointer>> Checkpointer::FromEnv(const RankEnv& env,
                                                              collectives::RendezvousStore* store,
                                                              CheckpointerOptions base) {
  if (env.checkpoint_dir.empty()) {
    return FailedPreconditionError("MUSTER_CHECKPOINT_DIR is not set: no checkpoint directory");
  }
  base.dir = env.checkpoint_dir;
  base.rank = env.rank;
  base.world_size = env.world_size;
  base.resume_step = env.resume_step;
  base.store = store;
  if (env.control_fd >= 0 && !base.on_commit) {
    // Announce each commit to the agent ourselves: catalogued even if the program never prints.
    const int fd = env.control_fd;
    base.on_commit = [fd](int64_t step, double seconds) {
      if (Status s = SendControlLine(fd, CheckpointLine(step, seconds)); !s.ok()) {
        log::Get("ckpt.write")->warn("announcing step {}: {}", step, s.ToString());
      }
    };
  }
  return Create(std::move(base));
}

Status Checkpointer::Save(int64_t step, const SaveState& state) {
  if (step < 0) return InvalidArgumentError("save: step must not be negative");
  std::lock_guard<std::mutex> sl(save_mu_);
  // Validate before waiting, so a bad call fails fast.
  std::set<std::string> names;
  bool any_cuda = false;
  for (const auto& t : state.tensors) {
    if (t.name.empty()) return InvalidArgumentError("save: a tensor has an empty name");
    if (!names.insert(t.name).second) {
      return InvalidArgumentError("save: tensor '" + t.name + "' is given twice");
    }
    for (int64_t d : t.shape)
      if (d < 0) return InvalidArgumentError("save: tensor '" + t.name + "' has a negative dim");
    if (t.replicated && !t.offsets.empty() &&
        (t.offsets != std::vector<int64_t>(t.shape.size(), 0) || t.lengths != t.shape)) {
      return InvalidArgumentError("save: replicated tensor '" + t.name + "' must be whole");
    }
    if (!t.offsets.empty() || !t.lengths.empty()) {
      MUSTER_RETURN_IF_ERROR(
          ValidateBox("save: tensor '" + t.name + "'", t.shape, t.offsets, t.lengths));
    }
    const auto& len = t.lengths.empty() ? t.shape : t.lengths;
    if (NumElements(len) > 0 && !t.data) {
      return InvalidArgumentError("save: tensor '" + t.name + "' has no data pointer");
    }
    any_cuda |= t.memory == MemoryKind::kCuda;
  }

  {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !busy_; });
  }

  auto job = std::make_unique<Job>();
  job->step = step;
  job->started = std::chrono::steady_clock::now();
  job->seq = ++save_seq_;
  job->metadata = state.metadata;
  uint64_t pos = 0;
  int replicated_index = 0;
  std::vector<const TensorRef*> sources;
  for (const auto& t : state.tensors) {
    if (t.replicated) {
      int owner = replicated_index++ % options_.world_size;
      if (owner != options_.rank) continue;
    }
    Piece p;
    p.name = t.name;
    p.dtype = t.dtype;
    p.shape = t.shape;
    p.replicated = t.replicated;
    if (t.offsets.empty()) {
      p.offsets.assign(t.shape.size(), 0);
      p.lengths = t.shape;
    } else {
      p.offsets = t.offsets;
      p.lengths = t.lengths;
    }
    p.bytes = static_cast<uint64_t>(NumElements(p.lengths)) * DTypeSize(t.dtype);
    p.staging_offset = pos;
    pos = AlignUp(pos + p.bytes, kDirectIoAlignment);
    job->pieces.push_back(std::move(p));
    sources.push_back(&t);
  }
  job->total = pos;
  MUSTER_RETURN_IF_ERROR(staging_.Reserve(job->total, any_cuda));
  char* base = staging_.data();

  // Hand the job to the writer first: it prepares the step directory and writes each chunk as
  // soon as the snapshot below has copied it, so the save overlaps the stall.
  Job* j = job.get();
  auto post = [&] {
    {
      std::lock_guard<std::mutex> l(mu_);
      job_ = std::move(job);
      busy_ = true;
    }
    cv_.notify_all();
  };
  if (options_.overlap_snapshot) post();

  auto snapshot = [&]() -> Status {
    constexpr uint64_t kPublishEvery = 64 << 20;
    DeviceCopyBatch batch;
    bool any_device = false;
    uint64_t prev_end = 0;
    for (size_t i = 0; i < j->pieces.size(); ++i) {
      const Piece& p = j->pieces[i];
      // Zero the alignment padding so the checksums are deterministic.
      if (p.staging_offset > prev_end) {
        std::memset(base + prev_end, 0, p.staging_offset - prev_end);
      }
      if (sources[i]->memory == MemoryKind::kCuda) {
        MUSTER_RETURN_IF_ERROR(batch.AddToHost(base + p.staging_offset, sources[i]->data, p.bytes));
        any_device = true;
      } else {
        const char* src = static_cast<const char*>(sources[i]->data);
        for (uint64_t off = 0; off < p.bytes; off += kPublishEvery) {
          uint64_t n = std::min(kPublishEvery, p.bytes - off);
          MUSTER_RETURN_IF_ERROR(CopyToHost(base + p.staging_offset + off, src + off, n,
                                            MemoryKind::kHost, options_.snapshot_threads));
          if (!any_device) j->Publish(p.staging_offset + off + n);
        }
      }
      prev_end = p.staging_offset + p.bytes;
    }
    if (j->total > prev_end) std::memset(base + prev_end, 0, j->total - prev_end);
    MUSTER_RETURN_IF_ERROR(batch.Wait());
    j->Publish(j->total);
    return Status::Ok();
  };
  Status st = snapshot();
  if (!options_.overlap_snapshot) {
    if (!st.ok()) return st;
    post();
    return st;
  }
  if (!st.ok()) {
    j->Fail(st);
    // The job ends with the same error; wait so the staging memory is free again.
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !busy_; });
  }
  return st;
}

Status Checkpointer::Wait() {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return !busy_; });
  return last_status_;
}

bool Checkpointer::Saving() {
  std::lock_guard<std::mutex> l(mu_);
  return busy_;
}

void Checkpointer::WorkerLoop() {
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    cv_.wait(l, [&] { return stop_ || job_ != nullptr; });
    if (stop_ && !job_) return;
    Job* job = job_.get();
    l.unlock();
    Status st = RunJob(*job);
    // The Save call may still be copying into staging (if the job failed early): the job, and
    // the staging memory, stay in use until the snapshot is over.
    job->AwaitReady(job->total).IgnoreError();
    if (!st.ok()) {
      log::Get("ckpt.write")->error("save of step {} failed: {}", job->step, st.ToString());
    }
    l.lock();
    last_status_ = st;
    job_.reset();
    busy_ = false;
    cv_.notify_all();
  }
}

Status Checkpointer::RunJob(Job& job) {
  const auto deadline = Clock::now() + options_.commit_timeout;
  auto remaining = [&] {
    return std::max(std::chrono::milliseconds(1),
                    std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
  };
  collectives::RendezvousStore* store = options_.world_size > 1 ? options_.store : nullptr;
  const std::string key = options_.store_prefix + "/" + std::to_string(job.seq);
  const std::string tmp = TmpStepPath(options_.dir, job.step);
  const std::string final_dir = StepPath(options_.dir, job.step);

  // Phase 1: rank 0 makes a fresh step-N.tmp (a leftover from a crashed attempt is removed).
  if (options_.rank == 0) {
    Status st;
    if (volume_->Exists(final_dir)) {
      st = FailedPreconditionError(StepStr(job.step) + " is already committed in " + options_.dir +
                                   "; a step directory is never rewritten");
    } else {
      st = volume_->RemoveAll(tmp);
      if (st.ok()) st = volume_->CreateDirs(tmp);
    }
    if (store) {
      MUSTER_RETURN_IF_ERROR(
          store->Set(key + "/dir", st.ok() ? "ok" : kErrorPrefix + st.ToString()));
    }
    MUSTER_RETURN_IF_ERROR(st);
  } else {
    auto v = store->Get(key + "/dir", remaining());
    if (!v.ok()) return v.status().WithContext(StepStr(job.step) + ": waiting for rank 0");
    if (*v != "ok") {
      return AbortedError(StepStr(job.step) + ": rank 0 could not start the save: " +
                          v->substr(sizeof(kErrorPrefix) - 1));
    }
  }

  // Phase 2: this rank's shard.
  ShardEntry shard;
  Status write_st = WriteShard(job, &shard);
  std::string own;
  if (write_st.ok()) {
    Manifest part;
    part.step = job.step;
    part.world_size = options_.world_size;
    part.block_size = options_.block_size;
    part.shards.push_back(shard);
    for (const auto& p : job.pieces) {
      TensorEntry t;
      t.name = p.name;
      t.dtype = p.dtype;
      t.shape = p.shape;
      t.replicated = p.replicated;
      t.slices.push_back({0, p.offsets, p.lengths, p.staging_offset, p.bytes});
      part.tensors.push_back(std::move(t));
    }
    own = SerializeManifest(part);
    last_shard_bytes_ = shard.size;
  } else {
    write_st = write_st.WithContext(StepStr(job.step) + ": rank " + std::to_string(options_.rank));
  }

  // Phase 3: report (ranks > 0) or commit (rank 0).
  if (options_.rank != 0) {
    MUSTER_RETURN_IF_ERROR(store->Set(key + "/rank/" + std::to_string(options_.rank),
                                      write_st.ok() ? own : kErrorPrefix + write_st.ToString()));
    MUSTER_RETURN_IF_ERROR(write_st);
    auto v = store->Get(key + "/commit", remaining());
    if (!v.ok()) return v.status().WithContext(StepStr(job.step) + ": waiting for the commit");
    if (*v != "ok") {
      return AbortedError(StepStr(job.step) +
                          " was not committed: " + v->substr(sizeof(kErrorPrefix) - 1));
    }
    return Status::Ok();
  }

  auto fail = [&](Status st) {
    if (store) store->Set(key + "/commit", kErrorPrefix + st.ToString()).IgnoreError();
    return st;
  };
  if (!write_st.ok()) return fail(write_st);
  std::vector<std::string> parts = {own};
  for (int r = 1; r < options_.world_size; ++r) {
    auto v = store->Get(key + "/rank/" + std::to_string(r), remaining());
    if (!v.ok()) {
      return fail(
          v.status().WithContext(StepStr(job.step) + ": waiting for rank " + std::to_string(r)));
    }
    if (v->rfind(kErrorPrefix, 0) == 0) {
      return fail(AbortedError(v->substr(sizeof(kErrorPrefix) - 1)));
    }
    parts.push_back(std::move(*v));
  }
  Status st = Commit(job, parts);
  if (!st.ok()) return fail(st);
  if (options_.on_commit) {
    options_.on_commit(
        job.step,
        std::chrono::duration<double>(std::chrono::steady_clock::now() - job.started).count());
  }
  if (store) MUSTER_RETURN_IF_ERROR(store->Set(key + "/commit", "ok"));
  return Status::Ok();
}

Status Checkpointer::WriteShard(Job& job, ShardEntry* shard) {
  const std::string path =
      JoinPath(TmpStepPath(options_.dir, job.step), ShardFileName(options_.rank));
  MUSTER_ASSIGN_OR_RETURN(auto f, volume_->NewWritableFile(path, options_.direct_io));
  const uint64_t bs = options_.block_size;
  const uint64_t total = job.total;
  shard->rank = options_.rank;
  shard->file = ShardFileName(options_.rank);
  shard->size = total;
  shard->metadata = job.metadata;
  shard->block_xxh3.assign((total + bs - 1) / bs, 0);
  const uint64_t chunk = options_.write_chunk;
  const uint64_t nchunks = (total + chunk - 1) / chunk;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  Status err;
  const char* data = staging_.data();
  auto work = [&] {
    for (;;) {
      uint64_t i = next++;
      if (i >= nchunks || failed) return;
      uint64_t off = i * chunk;
      uint64_t len = std::min(chunk, total - off);
      if (Status st = job.AwaitReady(off + len); !st.ok()) {
        std::lock_guard<std::mutex> l(err_mu);
        if (err.ok()) err = st;
        failed = true;
        return;
      }
      for (uint64_t b = off; b < off + len; b += bs) {
        shard->block_xxh3[b / bs] = Xxh3(data + b, std::min(bs, off + len - b));
      }
      Status st = f->Write(off, data + off, len);
      if (!st.ok()) {
        std::lock_guard<std::mutex> l(err_mu);
        if (err.ok()) err = st;
        failed = true;
        return;
      }
    }
  };
  int threads = static_cast<int>(std::min<uint64_t>(options_.io_threads, nchunks));
  std::vector<std::thread> ts;
  for (int i = 1; i < threads; ++i) ts.emplace_back(work);
  if (nchunks > 0) work();
  for (auto& t : ts) t.join();
  MUSTER_RETURN_IF_ERROR(err);
  MUSTER_RETURN_IF_ERROR(f->Sync());
  return f->Close();
}

Status Checkpointer::Commit(Job& job, const std::vector<std::string>& parts) {
  Manifest m;
  m.step = job.step;
  m.world_size = options_.world_size;
  m.block_size = options_.block_size;
  m.created_unix_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  std::map<std::string, size_t> index;
  for (size_t r = 0; r < parts.size(); ++r) {
    auto part = ParseManifest(parts[r], ManifestScope::kRankReport);
    if (!part.ok()) {
      return part.status().WithContext(StepStr(job.step) + ": rank " + std::to_string(r) +
                                       "'s report");
    }
    if (part->shards.size() != 1 || part->block_size != m.block_size) {
      return InvalidArgumentError(StepStr(job.step) + ": rank " + std::to_string(r) +
                                  " reported an inconsistent shard (block size or count)");
    }
    m.shards.push_back(part->shards[0]);
    for (auto& t : part->tensors) {
      auto it = index.find(t.name);
      if (it == index.end()) {
        index[t.name] = m.tensors.size();
        for (auto& s : t.slices) s.shard = static_cast<int>(r);
        m.tensors.push_back(std::move(t));
        continue;
      }
      TensorEntry& have = m.tensors[it->second];
      if (have.dtype != t.dtype || have.shape != t.shape || have.replicated != t.replicated) {
        return InvalidArgumentError(StepStr(job.step) + ": tensor '" + t.name +
                                    "' has a different dtype, shape or replication on rank " +
                                    std::to_string(r));
      }
      for (auto& s : t.slices) {
        s.shard = static_cast<int>(r);
        have.slices.push_back(std::move(s));
      }
    }
  }
  // Every element of every tensor must be stored exactly once.
  for (const auto& t : m.tensors) {
    int64_t total = NumElements(t.shape), covered = 0;
    for (const auto& s : t.slices) covered += NumElements(s.lengths);
    bool overlap = false;
    if (t.slices.size() <= 256) {
      for (size_t i = 0; i < t.slices.size() && !overlap; ++i) {
        for (size_t j = i + 1; j < t.slices.size() && !overlap; ++j) {
          Box a{t.slices[i].offsets, t.slices[i].lengths},
              b{t.slices[j].offsets, t.slices[j].lengths};
          Box x;
          overlap = NumElements(a.len) > 0 && NumElements(b.len) > 0 && Intersect(a, b, &x);
        }
      }
    }
    if (covered != total || overlap) {
      return InvalidArgumentError(StepStr(job.step) + ": tensor '" + t.name +
                                  "': the ranks' slices " +
                                  (overlap ? std::string("overlap")
                                           : "cover " + std::to_string(covered) + " of " +
                                                 std::to_string(total) + " elements"));
    }
  }
  // Re-parse what we write, so a manifest we could not read back is never committed.
  std::string bytes = SerializeManifest(m);
  MUSTER_RETURN_IF_ERROR(ParseManifest(bytes).status());

  const std::string tmp = TmpStepPath(options_.dir, job.step);
  const std::string final_dir = StepPath(options_.dir, job.step);
  {
    MUSTER_ASSIGN_OR_RETURN(auto f, volume_->NewWritableFile(JoinPath(tmp, kManifestName), false));
    MUSTER_RETURN_IF_ERROR(f->Write(0, bytes.data(), bytes.size()));
    MUSTER_RETURN_IF_ERROR(f->Sync());
    MUSTER_RETURN_IF_ERROR(f->Close());
  }
  MUSTER_RETURN_IF_ERROR(volume_->SyncDir(tmp));
  MUSTER_RETURN_IF_ERROR(volume_->Rename(tmp, final_dir));
  // From here the step directory is complete and in place; what fails now is its durability
  // (parent fsync) or the LATEST hint, and the error says so.
  const std::string after = StepStr(job.step) + " is in place but not durably published";
  MUSTER_RETURN_IF_ERROR(volume_->SyncDir(options_.dir).WithContext(after));
  MUSTER_RETURN_IF_ERROR(UpdateLatest(volume_, options_.dir, job.step).WithContext(after));
  log::Get("ckpt.write")
      ->info("committed step {} ({} bytes, world size {})", job.step, m.TotalBytes(), m.world_size);
  if (options_.retention.keep_last > 0) {
    auto gc = CollectGarbage(volume_, options_.dir, options_.retention, job.step);
    if (!gc.ok()) {
      log::Get("ckpt.write")->warn("retention after step {}: {}", job.step, gc.status().ToString());
    }
  }
  return Status::Ok();
}

Status Checkpointer::Restore(int64_t step, const std::vector<RestoreRequest>& requests) {
  MUSTER_ASSIGN_OR_RETURN(Manifest m, LoadManifest(volume_, options_.dir, step));
  const uint64_t bs = m.block_size;
  const uint64_t window = std::max<uint64_t>(bs, options_.write_chunk / bs * bs);
  RestorePlanBuilder plan(m, window);
  bool any_device = false;
  for (const auto& req : requests) {
    const TensorEntry* t = m.Find(req.name);
    if (!t) return NotFoundError(StepStr(step) + " has no tensor '" + req.name + "'");
    if (t->dtype != req.dtype) {
      return InvalidArgumentError(StepStr(step) + ": tensor '" + req.name + "' is " +
                                  std::string(DTypeName(t->dtype)) + ", the request asks for " +
                                  std::string(DTypeName(req.dtype)));
    }
    Box rb{req.offsets, req.lengths};
    if (rb.off.empty() && rb.len.empty()) {
      rb.off.assign(t->shape.size(), 0);
      rb.len = t->shape;
    }
    MUSTER_RETURN_IF_ERROR(
        ValidateBox("restore: tensor '" + req.name + "'", t->shape, rb.off, rb.len));
    const int64_t want = NumElements(rb.len);
    MUSTER_RETURN_IF_ERROR(CheckRestoreCapacity(req, req.offsets.empty() && req.lengths.empty(),
                                                static_cast<uint64_t>(want) * DTypeSize(t->dtype),
                                                StepStr(step) + ": tensor '" + req.name + "'"));
    if (want > 0 && !req.data) {
      return InvalidArgumentError("restore: tensor '" + req.name + "' has no destination");
    }
    if (want == 0) continue;
    any_device |= req.memory != MemoryKind::kHost;
    char* const data = static_cast<char*>(req.data);
    const size_t es = DTypeSize(t->dtype);
    const size_t nd = rb.off.size();
    int64_t covered = 0;
    for (const auto& s : t->slices) {
      const Box sb{s.offsets, s.lengths};
      Box x;
      if (NumElements(s.lengths) == 0 || !Intersect(rb, sb, &x)) continue;
      covered += NumElements(x.len);
      if (ContiguousIn(x, sb) && ContiguousIn(x, rb)) {
        plan.AddRun(s.shard, s.byte_offset + LinearIn(sb, x.off) * es, NumElements(x.len) * es,
                    data + LinearIn(rb, x.off) * es, req.memory, &t->name);
        continue;
      }
      // A box that is not one run: one run per row of its last dimension, in file order.
      const uint64_t row = static_cast<uint64_t>(x.len[nd - 1]) * es;
      std::vector<int64_t> p = x.off;
      for (;;) {
        plan.AddRun(s.shard, s.byte_offset + LinearIn(sb, p) * es, row, data + LinearIn(rb, p) * es,
                    req.memory, &t->name);
        int dim = static_cast<int>(nd) - 2;
        while (dim >= 0) {
          if (++p[dim] < x.off[dim] + x.len[dim]) break;
          p[dim] = x.off[dim];
          --dim;
        }
        if (dim < 0) break;
      }
    }
    if (covered != want) {
      return DataLossError(StepStr(step) + ": tensor '" + req.name + "': the stored slices cover " +
                           std::to_string(covered) + " of the " + std::to_string(want) +
                           " requested elements");
    }
  }
  RestorePlan p = plan.Take();

  // Restores share the staging ring and the device copier.
  std::lock_guard<std::mutex> rl(restore_mu_);
  RestoreIo io;
  io.manifest = &m;
  io.step = step;
  io.threads = options_.io_threads;
  io.slots = options_.restore_slots;
  io.ring = &restore_ring_;
  if (any_device) {
    if (options_.device_copier) {
      io.device = options_.device_copier;
    } else {
      if (!cuda_copier_) cuda_copier_ = NewCudaDeviceCopier();
      io.device = cuda_copier_.get();
    }
  }
  // Each shard is opened twice: O_DIRECT for aligned reads (whole blocks into aligned memory:
  // no page-cache copy), buffered for the rest.
  std::map<int, std::unique_ptr<ReadableFile>> files, direct_files;
  const std::string sdir = StepPath(options_.dir, step);
  for (const auto& w : p.windows) {
    if (files.count(w.shard)) continue;
    const std::string path = JoinPath(sdir, m.shards[w.shard].file);
    auto f = volume_->NewReadableFile(path, false);
    if (!f.ok()) return f.status().WithContext(StepStr(step));
    io.files[w.shard] = f->get();
    files[w.shard] = std::move(*f);
    if (options_.direct_io) {
      auto d = volume_->NewReadableFile(path, true);
      if (!d.ok()) return d.status().WithContext(StepStr(step));
      io.direct_files[w.shard] = d->get();
      direct_files[w.shard] = std::move(*d);
    }
  }
  return ExecuteRestorePlan(p, io);
}

StatusOr<int64_t> Checkpointer::LatestStep() { return LatestCommittedStep(volume_, options_.dir); }

StatusOr<int64_t> Checkpointer::ResumeStep() {
  if (options_.resume_step) return *options_.resume_step;
  return LatestStep();
}

StatusOr<Manifest> Checkpointer::ReadManifest(int64_t step) {
  return LoadManifest(volume_, options_.dir, step);
}

}  // namespace muster::checkpoint
