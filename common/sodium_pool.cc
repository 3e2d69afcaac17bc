// The pool of common/sodium_pool.h: libsodium's sodium_malloc, sodium_allocarray, sodium_free
// and sodium_mprotect_* for this process, with small allocations from one locked region.
//
// Layout: a reserved range of kRegionBytes (PROT_NONE) with one inaccessible page before and
// after it. Pieces of kPieceBytes are made readable and writable, locked and carved into slots of
// one size class as they are needed, from the front; they are never returned (at most the region,
// 4 MiB). A slot is [size u32][class u32][canary u64][user bytes][canary u64][unused]; the user
// pointer is 16-byte aligned. Free slots are linked through their first 8 bytes and are otherwise
// zero.

#include "common/sodium_pool.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace muster {
namespace {

constexpr size_t kRegionBytes = size_t{4} << 20;
constexpr size_t kPieceBytes = size_t{64} << 10;
constexpr size_t kPieces = kRegionBytes / kPieceBytes;
constexpr size_t kSlotBytes[] = {128, 512, 2048};
constexpr int kClasses = 3;
constexpr size_t kHeaderBytes = 16;
constexpr size_t kTrailerBytes = 8;
static_assert(kMaxPooledBytes == kSlotBytes[kClasses - 1] - kHeaderBytes - kTrailerBytes);

using MallocFn = void* (*)(size_t);
using AllocArrayFn = void* (*)(size_t, size_t);
using FreeFn = void (*)(void*);
using ProtectFn = int (*)(void*);

struct FreeSlot {
  FreeSlot* next;
};

struct Pool {
  std::mutex mu;
  enum class State { kUnset, kOn, kOff } state = State::kUnset;
  uint8_t* region = nullptr;  // first byte of the reserved range (after its leading guard page)
  size_t committed = 0;       // bytes from `region` made usable
  uint8_t piece_class[kPieces] = {};
  FreeSlot* free_list[kClasses] = {};
  uint64_t canary = 0;
  SodiumPoolStats stats;
};

// Never destroyed: libzmq's I/O threads may free after static destructors have run.
Pool& ThePool() {
  static Pool* pool = new Pool;
  return *pool;
}

[[noreturn]] void Misuse(const char* what) {
  // No allocation, no logging library: the heap may be what is broken.
  const char prefix[] = "muster: sodium_free: ";
  const char suffix[] = "; aborting\n";
  (void)!::write(2, prefix, sizeof(prefix) - 1);
  (void)!::write(2, what, std::strlen(what));
  (void)!::write(2, suffix, sizeof(suffix) - 1);
  std::abort();
}

template <typename Fn>
Fn Real(const char* name) {
  // RTLD_NEXT: the definition after this binary's, libsodium's (loaded as libzmq's dependency).
  void* sym = ::dlsym(RTLD_NEXT, name);
  return reinterpret_cast<Fn>(sym);
}

MallocFn RealMalloc() {
  static MallocFn fn = Real<MallocFn>("sodium_malloc");
  return fn;
}
FreeFn RealFree() {
  static FreeFn fn = Real<FreeFn>("sodium_free");
  return fn;
}

// Under pool.mu. Reads MUSTER_SODIUM_POOL and reserves the region on first use.
void InitLocked(Pool& pool) {
  if (pool.state != Pool::State::kUnset) return;
  pool.state = Pool::State::kOff;
  const char* env = std::getenv("MUSTER_SODIUM_POOL");
  if (env != nullptr && (std::strcmp(env, "off") == 0 || std::strcmp(env, "0") == 0)) return;
  uint64_t canary = 0;
  if (::getrandom(&canary, sizeof(canary), 0) != static_cast<ssize_t>(sizeof(canary))) return;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  void* base = ::mmap(nullptr, kRegionBytes + 2 * page, PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return;
  pool.region = static_cast<uint8_t*>(base) + page;
  // Out of core dumps, like libsodium's; the flag stays with pieces made usable later.
  (void)::madvise(pool.region, kRegionBytes, MADV_DONTDUMP);
  pool.canary = canary | 1;  // never zero, so a zeroed (freed) slot never passes
  pool.state = Pool::State::kOn;
  pool.stats.enabled = true;
}

// Under pool.mu: makes the next piece usable for class c and links its slots. False when the
// region is full or the kernel refuses.
bool CommitPieceLocked(Pool& pool, int c) {
  if (pool.committed + kPieceBytes > kRegionBytes) return false;
  uint8_t* piece = pool.region + pool.committed;
  if (::mprotect(piece, kPieceBytes, PROT_READ | PROT_WRITE) != 0) return false;
  if (::mlock(piece, kPieceBytes) != 0) ++pool.stats.lock_failures;
  pool.piece_class[pool.committed / kPieceBytes] = static_cast<uint8_t>(c);
  pool.committed += kPieceBytes;
  pool.stats.committed_bytes = pool.committed;
  // Linked back to front, so that the piece is used from its start.
  for (size_t off = kPieceBytes; off >= kSlotBytes[c]; off -= kSlotBytes[c]) {
    auto* slot = reinterpret_cast<FreeSlot*>(piece + off - kSlotBytes[c]);
    slot->next = pool.free_list[c];
    pool.free_list[c] = slot;
  }
  return true;
}

bool InRegion(const Pool& pool, const void* p) {
  auto* b = static_cast<const uint8_t*>(p);
  return pool.region != nullptr && b >= pool.region && b < pool.region + pool.committed;
}

void* PassThrough(Pool& pool, size_t size) {
  {
    std::lock_guard<std::mutex> l(pool.mu);
    ++pool.stats.passed_through;
  }
  MallocFn real = RealMalloc();
  if (real == nullptr) {
    errno = ENOMEM;
    return nullptr;
  }
  return real(size);
}

void* Allocate(size_t size) {
  Pool& pool = ThePool();
  int c = kClasses;  // none: passed through
  if (size <= kMaxPooledBytes) {
    c = 0;
    while (size + kHeaderBytes + kTrailerBytes > kSlotBytes[c]) ++c;
  }
  uint8_t* slot = nullptr;
  uint64_t canary = 0;
  {
    std::lock_guard<std::mutex> l(pool.mu);
    InitLocked(pool);
    if (pool.state == Pool::State::kOn && c < kClasses &&
        (pool.free_list[c] != nullptr || CommitPieceLocked(pool, c))) {
      FreeSlot* s = pool.free_list[c];
      pool.free_list[c] = s->next;
      slot = reinterpret_cast<uint8_t*>(s);
      canary = pool.canary;
      ++pool.stats.pooled;
      ++pool.stats.in_use;
    }
  }
  if (slot == nullptr) return PassThrough(pool, size);
  const uint32_t size32 = static_cast<uint32_t>(size);
  const uint32_t class32 = static_cast<uint32_t>(c);
  std::memset(slot, 0, sizeof(FreeSlot));  // the free-list link
  std::memcpy(slot, &size32, 4);
  std::memcpy(slot + 4, &class32, 4);
  std::memcpy(slot + 8, &canary, 8);
  std::memcpy(slot + kHeaderBytes + size, &canary, 8);
  return slot + kHeaderBytes;
}

// True when `p` is a pooled allocation, which it frees (or aborts on a broken canary).
bool FreePooled(void* p) {
  Pool& pool = ThePool();
  std::lock_guard<std::mutex> l(pool.mu);
  if (!InRegion(pool, p)) return false;
  auto* user = static_cast<uint8_t*>(p);
  const size_t offset = static_cast<size_t>(user - pool.region);
  const int c = pool.piece_class[offset / kPieceBytes];
  const size_t slot_bytes = kSlotBytes[c];
  if ((offset % kPieceBytes) % slot_bytes != kHeaderBytes)
    Misuse("not the start of a pooled allocation");
  uint8_t* slot = user - kHeaderBytes;
  uint32_t size32 = 0, class32 = 0;
  uint64_t before = 0, after = 0;
  std::memcpy(&size32, slot, 4);
  std::memcpy(&class32, slot + 4, 4);
  std::memcpy(&before, slot + 8, 8);
  if (before != pool.canary || class32 != static_cast<uint32_t>(c) ||
      size32 > slot_bytes - kHeaderBytes - kTrailerBytes) {
    Misuse(
        "the canary before the allocation is broken (an underrun, a double free or a foreign "
        "pointer)");
  }
  std::memcpy(&after, user + size32, 8);
  if (after != pool.canary) Misuse("the canary after the allocation is broken (an overrun)");
  ::explicit_bzero(slot, slot_bytes);
  auto* s = reinterpret_cast<FreeSlot*>(slot);
  s->next = pool.free_list[c];
  pool.free_list[c] = s;
  --pool.stats.in_use;
  return true;
}

int ProtectOrRefuse(void* p, const char* name) {
  if (p != nullptr) {
    Pool& pool = ThePool();
    std::lock_guard<std::mutex> l(pool.mu);
    if (InRegion(pool, p)) {
      errno = ENOTSUP;
      return -1;
    }
  }
  ProtectFn real = Real<ProtectFn>(name);
  if (real == nullptr) {
    errno = ENOSYS;
    return -1;
  }
  return real(p);
}

}  // namespace

SodiumPoolStats GetSodiumPoolStats() {
  Pool& pool = ThePool();
  std::lock_guard<std::mutex> l(pool.mu);
  InitLocked(pool);
  return pool.stats;
}

}  // namespace muster

// The interposed entry points, with libsodium's signatures and C linkage.
extern "C" {

__attribute__((visibility("default"))) void* sodium_malloc(size_t size) {
  return muster::Allocate(size);
}

__attribute__((visibility("default"))) void* sodium_allocarray(size_t count, size_t size) {
  if (count > 0 && size >= SIZE_MAX / count) {
    errno = ENOMEM;
    return nullptr;
  }
  return muster::Allocate(count * size);
}

__attribute__((visibility("default"))) void sodium_free(void* p) {
  if (p == nullptr || muster::FreePooled(p)) return;
  muster::FreeFn real = muster::RealFree();
  if (real == nullptr) muster::Misuse("a pointer not from the pool, and libsodium is not loaded");
  real(p);
}

__attribute__((visibility("default"))) int sodium_mprotect_noaccess(void* p) {
  return muster::ProtectOrRefuse(p, "sodium_mprotect_noaccess");
}

__attribute__((visibility("default"))) int sodium_mprotect_readonly(void* p) {
  return muster::ProtectOrRefuse(p, "sodium_mprotect_readonly");
}

__attribute__((visibility("default"))) int sodium_mprotect_readwrite(void* p) {
  return muster::ProtectOrRefuse(p, "sodium_mprotect_readwrite");
}

}  // extern "C"
