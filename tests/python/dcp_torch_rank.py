#!/usr/bin/env python3
"""One rank of test_dcp_torch.py under `muster run -np 2` (torch >= 2.2): torch's own
dcp.save, dcp.async_save and dcp.load through muster.dcp.MusterStorageWriter/Reader, Gloo on
CPU (and CUDA tensors too where a GPU is present). Every loaded tensor and object must equal the
saved one bit for bit; prints "rank R: dcp ok" at the end."""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from muster.dcp import MusterStorageReader, MusterStorageWriter

rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
torch.manual_seed(1234)  # the same model on every rank: replicated tensors, stored once
device = "cuda" if torch.cuda.is_available() else "cpu"
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
model.to(device)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(4, 64, device=device)).sum().backward()
opt.step()


def state():
    # (A plain optimizer state_dict, with its int keys, is left out: DCP wants it through
    # torch.distributed.checkpoint.state_dict.get_state_dict, a matter of DCP's planner, not of
    # the storage layer checked here; exp_avg-like tensors are covered by "f64" and "i64".)
    return {"model": model.state_dict(),
            "extra": {"epoch": 3, "data_position": [7, 11]},
            "bf16": torch.arange(10, dtype=torch.bfloat16),
            "f64": torch.linspace(0, 1, 33, dtype=torch.float64),
            "i64": torch.arange(17, dtype=torch.int64) * 3}


def zeroed(s):
    if isinstance(s, dict):
        return {k: zeroed(v) for k, v in s.items()}
    if isinstance(s, torch.Tensor):
        return torch.zeros_like(s)
    return s


def check(got, want, where="state"):
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            check(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.cpu(), want.cpu()), f"{where} differs"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


want = state()
dcp.save(want, storage_writer=MusterStorageWriter(step=5))
got = zeroed(want)
dcp.load(got, storage_reader=MusterStorageReader(step=5))
check(got, want)

# async_save: returns a future once the state is staged; the commit follows.
for p in model.parameters():
    p.data.add_(1.0)
want6 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state().items()}
fut = dcp.async_save(state(), storage_writer=MusterStorageWriter(step=6))
fut.result()
got = zeroed(want6)
dcp.load(got, storage_reader=MusterStorageReader(step="latest"))
check(got["model"], want6["model"], "async model")
check(got["bf16"], want6["bf16"], "async bf16")
check(got["i64"], want6["i64"], "async i64")
dist.barrier()
print(f"rank {rank}: dcp ok ({device}, torch {torch.__version__})", flush=True)
dist.destroy_process_group()
sys.exit(0)
