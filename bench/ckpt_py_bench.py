#!/usr/bin/env python3
"""The Python side of `muster-bench ckpt-py` (run by it; prints one JSON object).

The same bytes of torch tensors (or numpy arrays where torch is missing), saved:
  - through muster (muster.Checkpointer.save: the stall until it returns, then the commit);
  - through torch.save into a file + fsync (what a plain PyTorch script does);
  - through DCP's FileSystemWriter where torch's DCP is usable (torch >= 2.2);
beside two anchors measured in the same run: a memcpy of the same bytes (what the stall should
cost) and an O_DIRECT write + fsync of the same size in 32 MiB requests (what the disk can do).
Where `muster-bench` runs a snapshot server (MUSTER_SNAPSHOT_SOCKET), also the same state as an
in-memory snapshot (muster.Snapshotter): the stall until snapshot() returns, and the time until
the agent holds it (flush()); and read in place (Snapshotter.hold): the stall entering the
block and at its end, until the agent holds it, and for both the rank's own CPU per snapshot.
"""

import argparse
import json
import mmap
import os
import shutil
import sys
import time

import numpy as np

import muster


def now():
    return time.perf_counter()


def direct_write(path, nbytes):
    chunk = 32 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(4096) * (chunk // 4096))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o644)
    except OSError:
        fd = os.open(path, flags, 0o644)
    t0 = now()
    left = (nbytes + 4095) // 4096 * 4096
    while left > 0:
        n = min(chunk, left)
        os.write(fd, memoryview(buf)[:n])
        left -= n
    os.fsync(fd)
    t = now() - t0
    os.close(fd)
    os.remove(path)
    return t


def main():
    # The JSON goes to the original stdout; everything else written to fd 1 (the checkpointer
    # announces each commit there, `MUSTER_CHECKPOINT step=N`, when there is no control
    # channel) goes to stderr, so the caller parses one clean object.
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    per = args.size_mb * (1 << 20) // args.tensors // 4
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(per, dtype=np.float32) for _ in range(args.tensors)]
    state = {f"layer{i}": (torch.from_numpy(a) if torch else a) for i, a in enumerate(arrays)}
    nbytes = sum(a.nbytes for a in arrays)
    gb = nbytes / 1e9
    os.makedirs(args.dir, exist_ok=True)
    out = {"bytes": nbytes, "tensors": args.tensors, "torch": torch.__version__ if torch else None}

    dst = [np.empty_like(a) for a in arrays]
    best = float("inf")
    for _ in range(args.repeat + 1):
        t0 = now()
        for d, a in zip(dst, arrays):
            np.copyto(d, a)
        best = min(best, now() - t0)
    out["memcpy_s"] = best
    del dst

    out["disk_write_s"] = min(direct_write(os.path.join(args.dir, "direct.bin"), nbytes)
                              for _ in range(args.repeat))

    ck_dir = os.path.join(args.dir, "muster")

    def muster_saves(overlap):
        shutil.rmtree(ck_dir, ignore_errors=True)
        ck = muster.Checkpointer(ck_dir, 0, 1, overlap_snapshot=overlap)
        stalls, totals = [], []
        for step in range(args.repeat + 1):  # the first save sizes the staging buffer
            t0 = now()
            h = ck.save(step, state)
            t1 = now()
            h.wait()
            t2 = now()
            if step > 0:
                stalls.append(t1 - t0)
                totals.append(t2 - t0)
        del ck
        shutil.rmtree(ck_dir, ignore_errors=True)
        return min(stalls), min(totals)

    out["stall_s"], out["save_s"] = muster_saves(False)
    # The writers start on each chunk as soon as the snapshot has copied it.
    out["stall_overlap_s"], out["save_overlap_s"] = muster_saves(True)

    if os.environ.get("MUSTER_SNAPSHOT_SOCKET"):
        # time.process_time() is this process's CPU, every thread's: the rank's whole cost of a
        # snapshot (the copy, and the sender thread's checksum and send), whoever does it.
        snap = muster.Snapshotter()
        step = 0

        def best_of(take):
            """take(step, t0) takes one snapshot begun at t0 and returns its durations; each
            duration's best over args.repeat snapshots after a first one (which sizes the
            reused buffers), and the best CPU of a whole snapshot."""
            nonlocal step
            runs, cpu = [], []
            for i in range(args.repeat + 1):
                step += 1
                c0, t0 = time.process_time(), now()
                durations = take(step, t0)
                c1 = time.process_time()
                if i > 0:
                    runs.append(durations)
                    cpu.append(c1 - c0)
            return [min(d) for d in zip(*runs)], min(cpu)

        def copied(step, t0):
            snap.snapshot(step, state)
            t1 = now()
            snap.flush(600)
            return t1 - t0, now() - t0

        (out["snapshot_stall_s"], out["snapshot_held_s"]), out["snapshot_cpu_s"] = \
            best_of(copied)

        # The same state read in place by the agent (Snapshotter.hold): the stall entering the
        # block, and at its end with nothing in it (no forward pass to overlap: the agent's whole
        # read is waited for), then until the agent holds it.
        def held(step, t0):
            block = snap.hold(step, state)
            block.__enter__()
            t1 = now()
            block.__exit__(None, None, None)
            t2 = now()
            snap.flush(600)
            return t1 - t0, t2 - t1, now() - t0

        (out["hold_enter_s"], out["hold_end_s"], out["hold_held_s"]), out["hold_cpu_s"] = \
            best_of(held)
        out["hold_in_place"] = snap.in_place
        del snap

    if torch is not None:
        times = []
        for i in range(args.repeat):
            p = os.path.join(args.dir, f"torch-{i}.pt")
            t0 = now()
            with open(p, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            times.append(now() - t0)
            os.remove(p)
        out["torch_save_s"] = min(times)
        try:
            import torch.distributed.checkpoint as dcp
            times = []
            for i in range(args.repeat):
                p = os.path.join(args.dir, f"dcp-{i}")
                t0 = now()
                dcp.save(state, storage_writer=dcp.FileSystemWriter(p))
                times.append(now() - t0)
                shutil.rmtree(p, ignore_errors=True)
            out["dcp_save_s"] = min(times)
        except Exception as e:  # torch 1.13's DCP does not import on Python 3.11
            out["dcp_save_s"] = None
            out["dcp_skipped"] = f"{type(e).__name__}: {e}"[:200]
    out["save_gbps"] = gb / out["save_s"]
    out["save_overlap_gbps"] = gb / out["save_overlap_s"]
    out["disk_write_gbps"] = gb / out["disk_write_s"]
    if out.get("torch_save_s"):
        out["torch_save_gbps"] = gb / out["torch_save_s"]
    if out.get("dcp_save_s"):
        out["dcp_save_gbps"] = gb / out["dcp_save_s"]
    json.dump(out, result)
    result.write("\n")
    result.close()


if __name__ == "__main__":
    main()
