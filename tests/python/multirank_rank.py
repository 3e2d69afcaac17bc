#!/usr/bin/env python3
"""One rank of test_multirank.py, started by `muster run -np N`: `import muster` must work with
no PYTHONPATH of the test's own; saves step 7 with a row-sharded tensor split unevenly and step 8
with per-rank state, loads both back at the same world size and says so."""

import os
import sys

import numpy as np

import muster

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def full():
    return np.arange(7 * 5, dtype=np.float32).reshape(7, 5) * 1.5


off, rows = muster.shard_rows(7)
state = {
    "emb": muster.RowShard(full()[off:off + rows], total_rows=7),
    "even": muster.RowShard(np.full((2, 3), rank, dtype=np.int64)),
    "bias": np.linspace(0, 1, 11),
    "meta": {"epoch": 3, "rank": rank},
}
h = muster.save(7, state)
h.wait()
got = muster.load(7)
assert got["emb"].tobytes() == full()[off:off + rows].tobytes(), got["emb"]
assert got["even"].tolist() == [[rank] * 3] * 2
muster.save(8, {"rank_rng": muster.PerRank(np.array([rank * 10], dtype=np.int32))}).wait()
assert muster.load(8)["rank_rng"].tolist() == [rank * 10]
assert got["meta"] == {"epoch": 3, "rank": rank}, got["meta"]
print(f"rank {rank}/{world} ok", flush=True)
sys.exit(0)
