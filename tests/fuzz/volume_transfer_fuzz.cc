// libFuzzer target: volume-transfer requests and replies (node_agent/volume_transfer.h), both
// ends, without sockets.
//
// Server side: a VolumeRequest off the wire goes through CheckVolumeRequest (as the transfer
// of job "job") and, if accepted, ServeVolumeRequest over a fixture volume that holds a
// checkpoint, a FIFO, symbolic links to a file and a directory outside, and another job. Every
// reply the server makes must pass the client's CheckVolumeReply, and no byte of a file
// outside the job's directory may be served.
//
// Client side: a RemoteVolume whose transport answers each request with a reply taken from
// the input (raw protobuf bytes, a plausible reply with fuzzed fields, or an error) runs one
// operation; a ReadAt lands in a heap buffer of exactly the size asked, so ASan catches any
// copy past it. Whatever the replies, the operation returns a Status: no crash, no hang.

#include <fuzzer/FuzzedDataProvider.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "common/logging.h"
#include "common/path_name.h"
#include "node_agent/volume_transfer.h"

namespace {

namespace fs = std::filesystem;
using muster::proto::VolumeReply;
using muster::proto::VolumeRequest;

constexpr char kSecret[] = "SECRET-OUTSIDE-THE-JOB";

const std::string& Fixture() {
  static const std::string root = [] {
    muster::log::InitLogging("off").IgnoreError();
    fs::path base = fs::temp_directory_path() / ("muster-xfer-fuzz-" + std::to_string(getpid()));
    fs::remove_all(base);
    fs::path vol = base / "vol", out = base / "outside";
    fs::create_directories(vol / "job" / "step-000000010");
    fs::create_directories(vol / "other");
    fs::create_directories(out / "dir");
    std::ofstream(out / "secret") << kSecret;
    std::ofstream(out / "dir" / "MANIFEST") << kSecret;
    std::ofstream(vol / "other" / "MANIFEST") << kSecret;
    std::ofstream(vol / "job" / "LATEST") << "step-000000010\n";
    std::ofstream(vol / "job" / "step-000000010" / "MANIFEST") << "manifest bytes";
    std::ofstream(vol / "job" / "step-000000010" / "shard-00000.bin") << std::string(5000, 'w');
    ::mkfifo((vol / "job" / "step-000000010" / "fifo").c_str(), 0600);
    fs::create_symlink(out / "secret", vol / "job" / "step-000000010" / "link");
    fs::create_symlink(out / "dir", vol / "job" / "step-000000020");
    fs::create_symlink(vol / "other", vol / "job" / "other");
    return vol.string();
  }();
  return root;
}

void Server(FuzzedDataProvider& in) {
  VolumeRequest req;
  std::string bytes = in.ConsumeRemainingBytesAsString();
  if (!req.ParseFromString(bytes)) return;
  if (!muster::node_agent::CheckVolumeRequest(req, "job").ok()) return;
  auto reply = muster::node_agent::ServeVolumeRequest(Fixture(), req);
  if (!reply.ok()) return;
  if (!muster::node_agent::CheckVolumeReply(req, *reply).ok()) abort();  // server breaks protocol
  if (reply->data().find(kSecret) != std::string::npos) abort();         // served from outside
  for (const auto& e : reply->entries()) {
    if (!muster::ValidatePathName(e, "entry").ok()) abort();
  }
}

// One reply for `req`, from the input.
muster::StatusOr<muster::proto::Envelope> Answer(FuzzedDataProvider& in, const VolumeRequest& req) {
  if (in.remaining_bytes() == 0) return muster::UnavailableError("input exhausted");
  muster::proto::Envelope e;
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0:
      return muster::DataLossError("fuzzed error");
    case 1: {  // raw bytes
      std::string raw = in.ConsumeRandomLengthString(256);
      if (!e.mutable_volume_reply()->ParseFromString(raw)) e.mutable_volume_reply()->Clear();
      return e;
    }
    case 2:  // not a volume reply at all
      return e;
    default: {  // plausible, with fuzzed fields
      VolumeReply* r = e.mutable_volume_reply();
      uint8_t flags = in.ConsumeIntegral<uint8_t>();
      r->set_exists(flags & 1);
      r->set_is_dir(flags & 2);
      if (flags & 4) {
        r->set_size(in.ConsumeIntegral<uint64_t>());
      } else {
        r->set_size(in.ConsumeIntegralInRange<uint64_t>(0, 1 << 16));
      }
      if (flags & 8) r->set_age_s(in.ConsumeFloatingPoint<double>());
      if (flags & 16) r->add_entries(in.ConsumeRandomLengthString(16));
      int64_t delta = (flags & 32) ? in.ConsumeIntegralInRange<int64_t>(-3, 3) : 0;
      r->set_offset(req.offset() + static_cast<uint64_t>(delta));
      if (flags & 64) {
        uint64_t len = req.length() + static_cast<uint64_t>(in.ConsumeIntegralInRange<int>(-2, 2));
        r->set_data(std::string(std::min<uint64_t>(len, 1 << 20), 'd'));
      } else if (flags & 128) {
        r->set_data(in.ConsumeRandomLengthString(64));
      }
      return e;
    }
  }
}

void Client(FuzzedDataProvider& in) {
  int op = in.ConsumeIntegralInRange<int>(0, 5);
  std::string path =
      in.ConsumeBool() ? "job/step-000000010/shard-00000.bin" : in.ConsumeRandomLengthString(48);
  size_t n = in.ConsumeIntegralInRange<size_t>(0, 1 << 16);
  uint64_t offset = in.ConsumeBool() ? in.ConsumeIntegralInRange<uint64_t>(0, 1 << 16)
                                     : in.ConsumeIntegral<uint64_t>();
  auto v = muster::node_agent::RemoteVolume::WithTransport(
      [&in](muster::proto::Envelope e) { return Answer(in, e.volume_request()); }, "ckpt");
  switch (op) {
    case 0: {
      auto f = v->NewReadableFile(path, false);
      if (!f.ok()) return;
      auto buf = std::make_unique<char[]>(n);  // exactly n: ASan sees any byte past it
      for (int i = 0; i < 4; ++i) {
        auto got = (*f)->ReadAt(offset, buf.get(), n);
        if (!got.ok()) return;
        if (*got > n) abort();
      }
      return;
    }
    case 1: {
      auto list = v->ListDir(path);
      if (!list.ok()) return;
      for (const auto& e : *list) {
        if (!muster::ValidatePathName(e, "entry").ok()) abort();
      }
      return;
    }
    case 2:
      (void)v->FileSize(path);
      return;
    case 3:
      (void)v->AgeSeconds(path);
      return;
    case 4:
      (void)v->Exists(path);
      return;
    default: {
      VolumeRequest r;
      r.set_op(static_cast<VolumeRequest::Op>(in.ConsumeIntegralInRange<int>(0, 4)));
      r.set_path(path);
      r.set_offset(offset);
      r.set_length(static_cast<uint32_t>(n));
      (void)v->Call(r);
      return;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Fixture();
  FuzzedDataProvider in(data, size);
  if (in.ConsumeBool()) {
    Server(in);
  } else {
    Client(in);
  }
  return 0;
}
