#!/usr/bin/env python3
"""One rank of test_dcp.py under `muster run -np 2`: writes its DCP-style chunks (column boxes
of one tensor, a tensor only rank 0 has, a byte item each) through muster.dcp.DcpCore."""

import os

import numpy as np

from muster.dcp import BytesItem, DcpCore, TensorItem

rank = int(os.environ["RANK"])
g = np.arange(6 * 8, dtype=np.float32).reshape(6, 8) / 7
cols = slice(0, 4) if rank == 0 else slice(4, 8)
items = [TensorItem("layer.weight", [0, cols.start], [6, 8], np.ascontiguousarray(g[:, cols])),
         BytesItem(f"extra{rank}", f"pickled-{rank}".encode() * 3)]
if rank == 0:
    items.append(TensorItem("only0", [0], [5], np.arange(5, dtype=np.int64)))
DcpCore().save(12, items, extra=b"coordinator-metadata" if rank == 0 else b"").wait()
print(f"rank {rank} wrote", flush=True)
