// The pool of common/sodium_pool.h: libsodium's sodium_malloc, sodium_allocarray, sodium_free
// and sodium_mprotect_* for this process, with small allocations from one locked region.
//
// Layout: a reserved range of kRegionBytes (PROT_NONE) with one inaccessible page before and
// after it. Pieces of kPieceBytes are made readable and writable, locked and carved into slots of
// one size class as they are needed, from the front; they are never returned (at most the region,
// 4 MiB). A slot is [size u32][class u32][canary u64][user bytes][canary u64][unused]; the user
// pointer is 16-byte aligned. Nothing about free slots is kept inside them: each class has a
// queue of free slot offsets in the pool's own memory, and a free slot is all zeros, which an
// allocation checks before it hands the slot out (a write after free, or an overrun into a free
// neighbour, aborts there). The queue is first in, first out, so a freed slot is reused as late as
// possible and a second free of it is caught for as long as possible.

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
#include <new>

namespace muster {
namespace {

constexpr size_t kRegionBytes = size_t{4} << 20;
constexpr size_t kPieceBytes = size_t{64} << 10;
constexpr size_t kPieces = kRegionBytes / kPieceBytes;
constexpr size_t kSlotBytes[] = {128, 512, 2048};
constexpr int kClasses = 3;
constexpr size_t kHeaderBytes = 16;
constexpr size_t kTrailerBytes = 8;
constexpr uint8_t kGarbage = 0xdb;  // what a new allocation holds, as libsodium's
static_assert(kMaxPooledBytes == kSlotBytes[kClasses - 1] - kHeaderBytes - kTrailerBytes);

using MallocFn = void* (*)(size_t);
using FreeFn = void (*)(void*);
using ProtectFn = int (*)(void*);

// The free slots of one class, as offsets from the region's start: a ring with room for every
// slot the whole region could hold in this class.
struct FreeQueue {
  uint32_t* offsets = nullptr;
  size_t capacity = 0, head = 0, count = 0;

  void Push(uint32_t off) {
    offsets[(head + count) % capacity] = off;
    ++count;
  }
  uint32_t Pop() {
    const uint32_t off = offsets[head];
    head = (head + 1) % capacity;
    --count;
    return off;
  }
};

struct Pool {
  std::mutex mu;
  enum class State { kUnset, kOn, kOff } state = State::kUnset;
  uint8_t* region = nullptr;  // first byte of the reserved range (after its leading guard page)
  size_t committed = 0;       // bytes from `region` made usable
  uint8_t piece_class[kPieces] = {};
  FreeQueue free[kClasses];
  uint64_t canary = 0;
  SodiumPoolStats stats;
};

// Never destroyed: libzmq's I/O threads may free after static destructors have run.
Pool& ThePool() {
  static Pool* pool = new Pool;
  return *pool;
}

[[noreturn]] void Misuse(const char* fn, const char* what) {
  // No allocation, no logging library: the heap may be what is broken.
  const char prefix[] = "muster: ";
  const char sep[] = ": ";
  const char suffix[] = "; aborting\n";
  (void)!::write(2, prefix, sizeof(prefix) - 1);
  (void)!::write(2, fn, std::strlen(fn));
  (void)!::write(2, sep, sizeof(sep) - 1);
  (void)!::write(2, what, std::strlen(what));
  (void)!::write(2, suffix, sizeof(suffix) - 1);
  std::abort();
}

template <typename Fn>
Fn Real(const char* name) {
  // RTLD_NEXT: the definition after this binary's, libsodium's (loaded as libzmq's dependency).
  // Never its sodium_allocarray: libsodium calls sodium_malloc through its PLT, which is ours.
  return reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
}

MallocFn RealMalloc() {
  static MallocFn fn = Real<MallocFn>("sodium_malloc");
  return fn;
}
FreeFn RealFree() {
  static FreeFn fn = Real<FreeFn>("sodium_free");
  return fn;
}

bool AllZero(const uint8_t* p, size_t n) {
  uint64_t acc = 0;
  for (size_t i = 0; i < n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    acc |= w;
  }
  return acc == 0;
}

// Under pool.mu. Reads MUSTER_SODIUM_POOL and reserves the region on first use; anything the
// pool promises that the kernel refuses leaves it off (everything goes to libsodium).
void InitLocked(Pool& pool) {
  if (pool.state != Pool::State::kUnset) return;
  pool.state = Pool::State::kOff;
  const char* env = std::getenv("MUSTER_SODIUM_POOL");
  if (env != nullptr && std::strcmp(env, "off") == 0) return;
  uint64_t canary = 0;
  ssize_t got;
  do {
    got = ::getrandom(&canary, sizeof(canary), 0);
  } while (got < 0 && errno == EINTR);
  if (got != static_cast<ssize_t>(sizeof(canary))) return;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  void* base = ::mmap(nullptr, kRegionBytes + 2 * page, PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return;
  uint8_t* region = static_cast<uint8_t*>(base) + page;
  // Out of core dumps, like libsodium's; the flag stays with pieces made usable later (the
  // kernel copies it when it splits the mapping). A forked child keeps a copy, as with
  // libsodium's pages (MADV_WIPEONFORK would zero it, and then abort a child that frees a buffer
  // allocated before the fork as a double free).
  if (::madvise(region, kRegionBytes, MADV_DONTDUMP) != 0) {
    ::munmap(base, kRegionBytes + 2 * page);
    return;
  }
  size_t total = 0;
  for (int c = 0; c < kClasses; ++c) total += kRegionBytes / kSlotBytes[c];
  auto* offsets = new (std::nothrow) uint32_t[total];
  if (offsets == nullptr) {
    ::munmap(base, kRegionBytes + 2 * page);
    return;
  }
  for (int c = 0; c < kClasses; ++c) {
    pool.free[c].offsets = offsets;
    pool.free[c].capacity = kRegionBytes / kSlotBytes[c];
    offsets += pool.free[c].capacity;
  }
  pool.region = region;
  pool.canary = canary | 1;  // never zero, so a zeroed (free) slot never passes
  pool.state = Pool::State::kOn;
  pool.stats.enabled = true;
}

// Under pool.mu: makes the next piece usable for class c and queues its slots. False when the
// region is full or the kernel refuses.
bool CommitPieceLocked(Pool& pool, int c) {
  if (pool.committed + kPieceBytes > kRegionBytes) return false;
  uint8_t* piece = pool.region + pool.committed;
  if (::mprotect(piece, kPieceBytes, PROT_READ | PROT_WRITE) != 0) return false;
  if (::mlock(piece, kPieceBytes) != 0) ++pool.stats.lock_failures;
  pool.piece_class[pool.committed / kPieceBytes] = static_cast<uint8_t>(c);
  for (size_t off = 0; off < kPieceBytes; off += kSlotBytes[c]) {
    pool.free[c].Push(static_cast<uint32_t>(pool.committed + off));
  }
  pool.committed += kPieceBytes;
  pool.stats.committed_bytes = pool.committed;
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
        (pool.free[c].count > 0 || CommitPieceLocked(pool, c))) {
      slot = pool.region + pool.free[c].Pop();
      if (!AllZero(slot, kSlotBytes[c])) {
        Misuse("sodium_malloc",
               "a free slot of the pool was written to (a use after free, or an overrun of its "
               "neighbour)");
      }
      canary = pool.canary;
      ++pool.stats.pooled;
      ++pool.stats.in_use;
    }
  }
  if (slot == nullptr) return PassThrough(pool, size);
  const uint32_t size32 = static_cast<uint32_t>(size);
  const uint32_t class32 = static_cast<uint32_t>(c);
  std::memcpy(slot, &size32, 4);
  std::memcpy(slot + 4, &class32, 4);
  std::memcpy(slot + 8, &canary, 8);
  std::memset(slot + kHeaderBytes, kGarbage, size);
  std::memcpy(slot + kHeaderBytes + size, &canary, 8);
  return slot + kHeaderBytes;
}

// Under pool.mu, for a pointer in the region: its slot's size, or a Misuse abort when it is not
// the user pointer of a slot.
size_t SlotOfLocked(const Pool& pool, const uint8_t* user, const char* fn) {
  const size_t offset = static_cast<size_t>(user - pool.region);
  const size_t slot_bytes = kSlotBytes[pool.piece_class[offset / kPieceBytes]];
  if ((offset % kPieceBytes) % slot_bytes != kHeaderBytes) {
    Misuse(fn, "a pointer inside the pool that is not the start of an allocation");
  }
  return slot_bytes;
}

// True when `p` is a pooled allocation, which it frees (or aborts on a broken canary).
bool FreePooled(void* p) {
  Pool& pool = ThePool();
  std::lock_guard<std::mutex> l(pool.mu);
  if (!InRegion(pool, p)) return false;
  auto* user = static_cast<uint8_t*>(p);
  const size_t offset = static_cast<size_t>(user - pool.region);
  const int c = pool.piece_class[offset / kPieceBytes];
  const size_t slot_bytes = SlotOfLocked(pool, user, "sodium_free");
  uint8_t* slot = user - kHeaderBytes;
  uint32_t size32 = 0, class32 = 0;
  uint64_t before = 0, after = 0;
  std::memcpy(&size32, slot, 4);
  std::memcpy(&class32, slot + 4, 4);
  std::memcpy(&before, slot + 8, 8);
  if (before == 0 && size32 == 0 && class32 == 0) {
    Misuse("sodium_free", "a double free (the allocation is already free)");
  }
  if (before != pool.canary || class32 != static_cast<uint32_t>(c) ||
      size32 > slot_bytes - kHeaderBytes - kTrailerBytes) {
    Misuse("sodium_free", "the canary before the allocation is broken (an underrun)");
  }
  std::memcpy(&after, user + size32, 8);
  if (after != pool.canary) {
    Misuse("sodium_free", "the canary after the allocation is broken (an overrun)");
  }
  ::explicit_bzero(slot, slot_bytes);
  pool.free[c].Push(static_cast<uint32_t>(slot - pool.region));
  --pool.stats.in_use;
  return true;
}

int ProtectOrRefuse(void* p, ProtectFn real) {
  if (p != nullptr) {
    Pool& pool = ThePool();
    std::lock_guard<std::mutex> l(pool.mu);
    if (InRegion(pool, p)) {
      errno = ENOTSUP;
      return -1;
    }
  }
  if (real == nullptr) {
    errno = ENOSYS;
    return -1;
  }
  return real(p);
}

}  // namespace

size_t SodiumPoolSlotBytes(const void* p) {
  Pool& pool = ThePool();
  std::lock_guard<std::mutex> l(pool.mu);
  if (!InRegion(pool, p)) return 0;
  return SlotOfLocked(pool, static_cast<const uint8_t*>(p), "SodiumPoolSlotBytes");
}

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
  if (real == nullptr) {
    muster::Misuse("sodium_free", "a pointer not from the pool, and libsodium is not loaded");
  }
  real(p);
}

__attribute__((visibility("default"))) int sodium_mprotect_noaccess(void* p) {
  static muster::ProtectFn real = muster::Real<muster::ProtectFn>("sodium_mprotect_noaccess");
  return muster::ProtectOrRefuse(p, real);
}

__attribute__((visibility("default"))) int sodium_mprotect_readonly(void* p) {
  static muster::ProtectFn real = muster::Real<muster::ProtectFn>("sodium_mprotect_readonly");
  return muster::ProtectOrRefuse(p, real);
}

__attribute__((visibility("default"))) int sodium_mprotect_readwrite(void* p) {
  static muster::ProtectFn real = muster::Real<muster::ProtectFn>("sodium_mprotect_readwrite");
  return muster::ProtectOrRefuse(p, real);
}

}  // extern "C"
