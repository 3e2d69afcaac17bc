// Snapshot frames from a rank or a peer agent (checkpoint/snapshot_frame.h): never crashes,
// whatever decodes re-encodes to the same bytes, and the store keeps it only within its limit.
// Inputs are decoded as they are, and also (since a random input rarely carries a matching
// xxh3) used as the key and payload of a frame that is encoded, then flipped at one byte and
// decoded: a flip anywhere must be refused or decode to a different frame, never crash. The
// input is also restored from as a state payload (checkpoint/snapshot_state.h), which a peer's
// frame carries: a request for tensor "t" must be refused or fill exactly its buffer, and every
// tensor ReadSnapshotIndex lists must restore into a buffer of the size it gives. And the
// input is read as a sequence of store operations (puts, reservations, drops, gets). And it is
// read as a put in place's part list (checkpoint/snapshot_channel.h) for a payload of a size
// from its first bytes: refused, or every in-memory part lies inside the payload, in order,
// without overlap, and re-encoding a part list built from the result reads back the same.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/manifest.h"  // Xxh3
#include "checkpoint/snapshot_channel.h"
#include "checkpoint/snapshot_frame.h"
#include "checkpoint/snapshot_state.h"
#include "node_agent/snapshots/snapshot_store.h"

namespace {

using muster::checkpoint::DecodeSnapshotFrame;
using muster::checkpoint::EncodeSnapshotFrame;
using muster::checkpoint::SnapshotFrame;

constexpr uint64_t kLimit = 1 << 16;

void Keep(const SnapshotFrame& f) {
  muster::node_agent::SnapshotStore store({.memory_limit = 4096, .keep_steps = 2});
  (void)store.Put(f);
  if (store.used_bytes() > 4096 || store.reserved_bytes() > 4096) std::abort();
  auto got = store.Get(f.key.job, f.key.rank, f.key.step);
  if (got.ok() && (*got)->payload != f.payload) std::abort();
  store.DropJob(f.key.job);
  if (store.used_bytes() != 0 || store.reserved_bytes() != 0) std::abort();
}

// The input as a sequence of store operations (4 bytes each) on a store with a window of
// extra steps: the accounting must stay exact and within the limit whatever the order.
void Sequence(std::string_view in) {
  constexpr uint64_t kStoreLimit = 2000;
  const int keep = 1 + (in.empty() ? 0 : static_cast<uint8_t>(in[0]) % 3);
  muster::node_agent::SnapshotStore store(
      {.memory_limit = kStoreLimit, .keep_steps = keep, .window_steps = 4});
  for (size_t i = 1; i + 4 <= in.size() && i < 4 * 512; i += 4) {
    const auto b = [&](size_t k) { return static_cast<uint8_t>(in[i + k]); };
    const std::string job = "j" + std::to_string(b(0) & 1);
    const int rank = (b(0) >> 1) & 3;
    const int op = (b(0) >> 3) & 7;
    if (op < 5) {
      SnapshotFrame f;
      f.key = {
          .job = job, .attempt = (b(0) >> 6) & 3, .rank = rank, .world_size = 4, .step = b(1) % 32};
      f.payload.assign(b(2) + (b(3) & 3) * 256, static_cast<char>(b(3)));
      f.payload_xxh3 = muster::checkpoint::Xxh3(f.payload.data(), f.payload.size());
      (void)store.Put(std::move(f));
    } else if (op == 5) {
      (void)store.Reserve(job, rank, b(2) * 4);
    } else if (op == 6) {
      store.DropJob(job);
    } else {
      (void)store.Get(job, rank, b(1) % 32);
    }
    uint64_t held = 0;
    for (const auto& j : store.Jobs()) {
      for (const auto& h : store.Held(j)) held += h.bytes;
    }
    if (held != store.used_bytes() || store.used_bytes() > kStoreLimit ||
        store.reserved_bytes() + store.extra_bytes() > kStoreLimit) {
      std::abort();
    }
  }
  store.DropJob("j0");
  store.DropJob("j1");
  if (store.used_bytes() != 0 || store.reserved_bytes() != 0 || store.extra_bytes() != 0) {
    std::abort();
  }
}

}  // namespace

void PartList(std::string_view data) {
  if (data.size() < 2) return;
  const size_t payload_size =
      static_cast<uint8_t>(data[0]) | (static_cast<size_t>(static_cast<uint8_t>(data[1])) << 8);
  std::string_view in = data.substr(2);
  auto reader = [&in](char* out, size_t n) {
    if (n > in.size()) return muster::UnavailableError("input used up");
    std::copy(in.begin(), in.begin() + n, out);
    in.remove_prefix(n);
    return muster::Status::Ok();
  };
  std::string payload(payload_size, '\0');
  auto parts = muster::checkpoint::ReadSnapshotParts(reader, &payload);
  if (!parts.ok()) return;
  uint64_t end = 0;
  std::vector<muster::checkpoint::SnapshotPart> again;
  for (const auto& p : *parts) {
    if (p.length == 0 || p.at < end || p.at + p.length > payload.size()) std::abort();
    if (p.at > end)
      again.push_back(muster::checkpoint::SnapshotPart::Here(
          std::string_view(payload).substr(end, p.at - end)));
    again.push_back({{}, p.address, p.length});
    end = p.at + p.length;
  }
  if (end < payload.size()) {
    again.push_back(muster::checkpoint::SnapshotPart::Here(std::string_view(payload).substr(end)));
  }
  if (again.empty()) return;  // an empty payload of zero-length parts
  const std::string wire = muster::checkpoint::EncodeSnapshotParts(again);
  std::string_view w = wire;
  std::string payload2(payload.size(), '\0');
  auto parts2 = muster::checkpoint::ReadSnapshotParts(
      [&w](char* out, size_t n) {
        if (n > w.size()) return muster::UnavailableError("short");
        std::copy(w.begin(), w.begin() + n, out);
        w.remove_prefix(n);
        return muster::Status::Ok();
      },
      &payload2);
  if (!parts2.ok() || parts2->size() != parts->size() || !w.empty()) std::abort();
  for (size_t i = 0; i < parts->size(); ++i) {
    if ((*parts2)[i].at != (*parts)[i].at || (*parts2)[i].address != (*parts)[i].address ||
        (*parts2)[i].length != (*parts)[i].length)
      std::abort();
    // The inline bytes land where they were; the in-memory ranges stay untouched (zero).
    std::fill(payload.begin() + (*parts)[i].at,
              payload.begin() + (*parts)[i].at + (*parts)[i].length, '\0');
  }
  if (payload2 != payload) std::abort();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  Sequence(in);
  PartList(in);
  if (in.size() >= muster::checkpoint::kSnapshotHeaderBytes) {
    (void)muster::checkpoint::DecodeSnapshotHeader(
        in.substr(0, muster::checkpoint::kSnapshotHeaderBytes), kLimit);
  }
  {
    // The receivers' copy-free decoders (the peer agent keeps the request's own buffer; the
    // local server reads the payload apart) agree with DecodeSnapshotFrame on every input:
    // the same frame, or an error both ways.
    auto f = DecodeSnapshotFrame(in, kLimit);
    auto g = muster::checkpoint::DecodeSnapshotFrameInPlace(std::string(in), kLimit);
    if (f.ok() != g.ok()) std::abort();
    if (f.ok() &&
        (!(f->key == g->key) || f->payload != g->payload || f->payload_xxh3 != g->payload_xxh3)) {
      std::abort();
    }
    if (in.size() >= muster::checkpoint::kSnapshotHeaderBytes) {
      auto h = muster::checkpoint::DecodeSnapshotHeader(
          in.substr(0, muster::checkpoint::kSnapshotHeaderBytes), kLimit);
      if (h.ok()) {
        std::string_view body = in.substr(muster::checkpoint::kSnapshotHeaderBytes);
        std::string_view job = body.substr(0, std::min<size_t>(h->job_length, body.size()));
        auto p =
            muster::checkpoint::DecodeSnapshotParts(*h, job, std::string(body.substr(job.size())));
        if (p.ok() != f.ok()) std::abort();
        if (p.ok() && (!(p->key == f->key) || p->payload != f->payload)) std::abort();
      }
    }
    if (f.ok()) {
      auto back = EncodeSnapshotFrame(f->key, f->payload);
      if (!back.ok() || *back != in) std::abort();
      auto prefix =
          muster::checkpoint::EncodeSnapshotPrefix(f->key, f->payload.size(), f->payload_xxh3);
      if (!prefix.ok() || *prefix + f->payload != in) std::abort();
      Keep(*f);
    }
  }
  {
    std::vector<char> out(64);
    std::string meta;
    std::vector<muster::checkpoint::RestoreRequest> req = {
        muster::checkpoint::RestoreRequest::Whole("t", muster::checkpoint::DType::kU8, out.data()),
    };
    req[0].offsets = {0};
    req[0].lengths = {64};
    (void)muster::checkpoint::RestoreSnapshotState(in, req, &meta);
  }
  // The index (what the Python package sizes its tensors from) and the restore agree: every
  // tensor the index lists restores into a buffer of exactly the size it says.
  if (auto index = muster::checkpoint::ReadSnapshotIndex(in); index.ok()) {
    uint64_t total = 0;
    for (const auto& t : *index) total += t.bytes;
    if (total <= (uint64_t{1} << 20) && index->size() <= 64) {
      std::vector<std::vector<char>> bufs;
      std::vector<muster::checkpoint::RestoreRequest> all;
      for (const auto& t : *index) {
        bufs.emplace_back(std::max<uint64_t>(t.bytes, 1));
        auto r =
            muster::checkpoint::RestoreRequest::Whole(t.name, t.dtype, bufs.back().data(), t.bytes);
        r.offsets = t.offsets;
        r.lengths = t.lengths;
        all.push_back(std::move(r));
      }
      if (!muster::checkpoint::RestoreSnapshotState(in, all).ok()) std::abort();
    }
  }
  if (size < 12) return 0;
  muster::checkpoint::SnapshotKey key;
  key.world_size = 1 + data[0] % 8;
  key.rank = data[1] % 9;
  key.attempt = data[2];
  key.step = static_cast<int64_t>(data[3]) - 2;
  key.job = std::string(in.substr(4, 1 + data[4] % 6));
  size_t flip = data[5] | (size_t{data[6]} << 8);
  std::string_view payload = in.substr(12);
  auto enc = EncodeSnapshotFrame(key, payload);
  if (!enc.ok()) return 0;
  auto f = DecodeSnapshotFrame(*enc, kLimit);
  if (!f.ok() || !(f->key == key) || f->payload != payload) std::abort();
  Keep(*f);
  std::string bad = *enc;
  bad[flip % bad.size()] ^= static_cast<char>(1 + data[7] % 255);
  if (auto g = DecodeSnapshotFrame(bad, kLimit); g.ok()) {
    if (g->key == key && g->payload == payload) std::abort();
    Keep(*g);
  }
  return 0;
}
