#include "node_agent/replication_worker.h"

#include <chrono>
#include <filesystem>

#include "checkpoint/replicate.h"
#include "common/curve.h"
#include "common/path_name.h"
#include "node_agent/checkpoint_steps.h"
#include "node_agent/volume_transfer.h"

namespace muster::node_agent {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

// The local volume, counting the bytes written through it (a copy's progress).
class CountingVolume final : public checkpoint::VolumeWrapper {
 public:
  CountingVolume(checkpoint::Volume* target, std::atomic<uint64_t>* bytes)
      : VolumeWrapper(target), bytes_(bytes) {}
  StatusOr<std::unique_ptr<checkpoint::WritableFile>> NewWritableFile(const std::string& path,
                                                                      bool direct) override {
    MUSTER_ASSIGN_OR_RETURN(auto f, target()->NewWritableFile(path, direct));
    return std::unique_ptr<checkpoint::WritableFile>(new File(std::move(f), bytes_));
  }

 private:
  class File final : public checkpoint::WritableFileWrapper {
   public:
    File(std::unique_ptr<checkpoint::WritableFile> f, std::atomic<uint64_t>* bytes)
        : WritableFileWrapper(std::move(f)), bytes_(bytes) {}
    StatusOr<size_t> WriteAt(uint64_t offset, const void* data, size_t n) override {
      auto w = target()->WriteAt(offset, data, n);
      if (w.ok()) bytes_->fetch_add(*w, std::memory_order_relaxed);
      return w;
    }

   private:
    std::atomic<uint64_t>* bytes_;
  };
  std::atomic<uint64_t>* bytes_;
};

}  // namespace

std::string TransferKeyOf(const proto::ReplicateCheckpoint& r) {
  auto pub = PublicKeyFromSecret(r.client_secret());
  return pub.ok() ? *pub : "";
}

ReplicationWorker::ReplicationWorker(proto::NodeLabels labels, bool insecure, Outputs outputs)
    : labels_(std::move(labels)), insecure_(insecure), out_(std::move(outputs)) {}

ReplicationWorker::~ReplicationWorker() { Stop(); }

void ReplicationWorker::Offer(const proto::ReplicateCheckpoint& r) {
  ReplicationQueue::Offered offered;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_) return;
    for (auto it = copiers_.begin(); it != copiers_.end();) {
      if (it->second->load()) {
        it->first.join();
        it = copiers_.erase(it);
      } else {
        ++it;
      }
    }
    offered = queue_.Offer(r);
    if (offered.start) {
      auto finished = std::make_shared<std::atomic<bool>>(false);
      copiers_.emplace_back(std::thread([this, first = *offered.start, finished] {
                              for (std::optional<proto::ReplicateCheckpoint> next = first; next;) {
                                out_.report(Copy(*next));
                                std::lock_guard<std::mutex> l(mu_);
                                next = stop_ ? std::nullopt : queue_.Finished(*next);
                              }
                              finished->store(true);
                            }),
                            finished);
    }
  }
  for (const auto& [req, by] : offered.superseded) {
    logger_->info("replication of {} step {} superseded by step {}", req.job_id(), req.step(), by);
    proto::AgentReport rep;
    rep.set_job_id(req.job_id());
    rep.set_checkpoint_step(req.step());
    rep.set_checkpoint_volume(req.volume());
    rep.set_replicate_superseded_by(by);
    rep.set_transfer_key(TransferKeyOf(req));
    out_.report(std::move(rep));
  }
}

std::vector<CopyMetrics> ReplicationWorker::CopiesInFlight() const {
  std::vector<CopyMetrics> out;
  auto now = Clock::now();
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& f : in_flight_) {
    CopyMetrics c = f->what;
    c.bytes = f->bytes.load(std::memory_order_relaxed);
    c.seconds = std::chrono::duration<double>(now - f->started).count();
    out.push_back(std::move(c));
  }
  return out;
}

void ReplicationWorker::RequestStop() {
  std::lock_guard<std::mutex> l(mu_);
  stop_ = true;
}

void ReplicationWorker::Stop() {
  std::vector<std::pair<std::thread, std::shared_ptr<std::atomic<bool>>>> copiers;
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
    copiers.swap(copiers_);
  }
  for (auto& [t, finished] : copiers) t.join();
}

proto::AgentReport ReplicationWorker::Copy(const proto::ReplicateCheckpoint& r) {
  std::string root;
  for (const auto& v : labels_.volumes()) {
    if (v.name() == r.volume()) root = v.path();
  }
  proto::AgentReport rep;
  rep.set_job_id(r.job_id());
  rep.set_checkpoint_step(r.step());
  rep.set_checkpoint_volume(r.volume());
  rep.set_transfer_key(TransferKeyOf(r));
  auto t0 = Clock::now();
  auto flight = std::make_shared<InFlight>();
  flight->what.job_id = r.job_id();
  flight->what.volume = r.volume();
  flight->what.source_node = r.source_node();
  flight->what.step = r.step();
  flight->started = t0;
  {
    std::lock_guard<std::mutex> l(mu_);
    in_flight_.push_back(flight);
  }
  struct Done {
    ReplicationWorker* w;
    InFlight* f;
    ~Done() {
      std::lock_guard<std::mutex> l(w->mu_);
      std::erase_if(w->in_flight_, [&](const auto& p) { return p.get() == f; });
    }
  } done{this, flight.get()};
  CountingVolume local(checkpoint::LocalVolume(), &flight->bytes);
  // The job id becomes <volume root>/<job>: a name, never a path that leaves the volume.
  Status st = ValidatePathName(r.job_id(), "job id to replicate");
  if (!st.ok()) {
    // reported below
  } else if (root.empty()) {
    st = NotFoundError("volume " + r.volume() + " is not mounted on " + labels_.name());
  } else {
    KeyPair client;
    client.secret_key = r.client_secret();
    auto pub = PublicKeyFromSecret(client.secret_key);
    if (!insecure_ && !pub.ok()) {
      st = pub.status();
    } else {
      if (pub.ok()) client.public_key = *pub;
      // The source authorizes our key when its AllowTransfer arrives: retry a refusal.
      for (int attempt = 0;; ++attempt) {
        auto remote = RemoteVolume::Connect(r.source_endpoint(), r.source_key(), client, insecure_,
                                            r.volume());
        if (!remote.ok()) {
          st = remote.status();
          break;
        }
        // RemoteVolume::Exists reads a refused handshake as "no such step": ask once in a
        // way that surfaces the refusal (Unavailable, retried below) before copying.
        if (auto probe = (*remote)->ListDir(r.job_id()); !probe.ok()) {
          if (probe.status().code() == StatusCode::kUnavailable && attempt < 5) {
            std::this_thread::sleep_for(milliseconds(200 * (attempt + 1)));
            continue;
          }
          if (probe.status().code() == StatusCode::kDeadlineExceeded) {
            // The source does not answer (gone, or restarted elsewhere): report it now; the
            // coordinator retries from the source's current endpoint.
            st = probe.status().WithContext("source " + r.source_node());
            break;
          }
        }
        auto report = checkpoint::Replicate(remote->get(), r.job_id(), &local,
                                            (fs::path(root) / r.job_id()).string(), r.step());
        if (report.ok()) {
          double s = std::chrono::duration<double>(Clock::now() - t0).count();
          logger_->info("replicated {} step {} from {} ({} shard(s), {:.1f} MiB{}, {:.2f} s)",
                        r.job_id(), r.step(), r.source_node(), report->shards_copied,
                        report->bytes_copied / 1048576.0,
                        report->already_present ? ", already present" : "", s);
          st = Status::Ok();
          break;
        }
        st = report.status();
        if (st.code() != StatusCode::kUnavailable || attempt >= 5) break;
        std::this_thread::sleep_for(milliseconds(200 * (attempt + 1)));
      }
    }
  }
  if (st.ok()) {
    rep.set_checkpoint_replica(true);
    // The replica's size, as its (verified) MANIFEST gives it.
    if (auto bytes = GoodStepBytes((fs::path(root) / r.job_id()).string(), r.step()); bytes.ok()) {
      rep.set_checkpoint_bytes(*bytes);
    }
    out_.prune((fs::path(root) / r.job_id()).string(), r.checkpoint_keep());
  } else {
    logger_->error("replication of {} step {} from {} failed: {}", r.job_id(), r.step(),
                   r.source_node(), st.ToString());
    rep.set_replicate_error(st.ToString());
  }
  return rep;
}

}  // namespace muster::node_agent
