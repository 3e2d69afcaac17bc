#pragma once

// A pool for the small guarded allocations libzmq makes in every CURVE handshake.
//
// libzmq (4.3) keeps the plaintext of each handshake box (HELLO, COOKIE, WELCOME, INITIATE,
// VOUCH, READY) in memory from libsodium's sodium_allocarray: for each one, a fresh mapping with
// a guard page on either side, locked into RAM, and undone again when the box is sealed or
// opened. Each allocation costs about seven system calls (mmap, mprotect x2, mlock; munlock,
// mprotect, munmap); the mprotect and munmap calls split and merge the process's mappings and
// interrupt every other CPU that runs one of its threads (TLB shootdowns). A rendezvous store
// taking 512 relays' handshakes spent about 35% of the setup's CPU on this, and a relay as much
// per handshake.
//
// Linked into a binary (the object library muster_sodium_pool), this file defines
// sodium_malloc, sodium_allocarray and sodium_free, and so stands in for libsodium's own for
// every library in the process (symbol interposition). Allocations of up to kMaxPooledBytes come
// from one reserved region of locked pages, carved into fixed slots; larger ones, those past the
// pool's limit, and every allocation when MUSTER_SODIUM_POOL=off go to libsodium's own functions,
// unchanged.
//
// What a pooled allocation keeps of libsodium's guarantees:
//   - its memory is locked (mlock, once per 64 KiB piece of the region; a failure is counted and,
//     as in libsodium, not fatal) and excluded from core dumps (MADV_DONTDUMP; the pool stays off
//     if the kernel refuses that);
//   - it is zeroed when freed, and holds 0xdb bytes when allocated, as libsodium's;
//   - a canary before it and one after it, random per process, are checked when it is freed; a
//     mismatch aborts, as libsodium's does;
//   - a free slot holds nothing at all (the pool's free queues are its own memory): an allocation
//     checks that the slot it takes is still all zeros and aborts if not, which catches a write
//     after free and an overrun into a free neighbour before the slot is used again;
//   - a double free aborts as long as the slot has not been handed out again; free slots are
//     reused first in, first out, so that is as long as possible;
//   - the region has inaccessible pages before and after it.
// What it gives up, all from dropping the guard pages and the unmapping of each allocation:
//   - a read past an allocation, before it, or after it was freed, is not caught (it reads a
//     neighbour's bytes, or zeros), where libsodium's faults;
//   - a write past the trailing canary into a neighbour that is in use is caught only when that
//     neighbour is freed (as a broken canary), not at the write;
//   - a double free after the slot was reused frees the new owner's buffer;
//   - locked pages are never returned: at most the 4 MiB region, for the process's life, counted
//     against RLIMIT_MEMLOCK (libzmq's handshakes need a few KiB each, so this is reached only by
//     thousands of handshakes at once; past it, allocations go to libsodium).
// libzmq holds the keys these plaintexts protect (the long-term secret key, the ephemeral secret
// key and the session's precomputed key) in ordinary heap memory for the socket's whole life, and
// the plaintexts themselves live for microseconds, so the guard pages bought little for them. The
// trade is in docs/security.md ("libsodium's allocations in CURVE handshakes").
//
// sodium_mprotect_noaccess/readonly/readwrite are defined too: on a pooled allocation they fail
// (-1, errno ENOTSUP) instead of changing the protection of pages shared with other slots; on
// any other pointer they are libsodium's.
//
// Only muster's own daemons and the benchmark link it (muster, muster-bench); the ranks, which
// are the user's processes, and the Python module keep libsodium's allocator.

#include <cstddef>
#include <cstdint>

namespace muster {

inline constexpr size_t kMaxPooledBytes = 2048 - 24;  // the largest slot, less its canaries

struct SodiumPoolStats {
  bool enabled = false;          // the pool serves: MUSTER_SODIUM_POOL is not "off" and the region
                                 // could be reserved
  uint64_t pooled = 0;           // allocations served from the pool, ever
  uint64_t passed_through = 0;   // allocations handed to libsodium (too large, pool full, off)
  uint64_t in_use = 0;           // pooled allocations not yet freed
  uint64_t committed_bytes = 0;  // pages of the region in use by slots (locked where mlock worked)
  uint64_t lock_failures = 0;    // pieces whose mlock failed (RLIMIT_MEMLOCK)
};

// The pool's counters (reads MUSTER_SODIUM_POOL and reserves the region if nothing has yet).
// Defined only where the binary links muster_sodium_pool.
SodiumPoolStats GetSodiumPoolStats();

// The size of the slot that holds the pooled allocation `p` (header and canaries included), or 0
// when `p` is not from the pool. Aborts, as sodium_free would, on a pointer inside the pool that
// is not an allocation's start.
size_t SodiumPoolSlotBytes(const void* p);

}  // namespace muster
