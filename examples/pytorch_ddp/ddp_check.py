#!/usr/bin/env python3
"""A small PyTorch DDP job that checks its own result; run it under `muster run -np N`.

It uses only the env contract (init_method="env://": RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and the gloo backend, as an unchanged torchrun script would. Each rank trains the
same model on different data; DDP must average the gradients, so after every step

  * each rank's gradient equals the mean of every rank's local gradient (computed here without
    DDP and summed with an explicit all_reduce), and
  * every rank holds identical parameters.

Exit codes: 0 when both hold, 1 when they do not, 77 when torch is not installed (a skip).
"""
import gc
import os
import sys

try:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
except ImportError as e:
    print(f"skip: {e}", file=sys.stderr)
    sys.exit(77)

STEPS = 3


def main():
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", init_method="env://")
    assert dist.get_rank() == rank and dist.get_world_size() == world

    torch.manual_seed(1234)  # the same initial model everywhere
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4))
    reference.load_state_dict(model.state_dict())
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for step in range(STEPS):
        x = torch.randn(8, 16, generator=gen)
        y = torch.randn(8, 4, generator=gen)

        # What DDP should produce: the mean over ranks of the local gradients.
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        expected = []
        for p in reference.parameters():
            g = p.grad.detach().clone()
            dist.all_reduce(g)
            expected.append(g / world)

        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        for got, want in zip(model.parameters(), expected):
            if not torch.allclose(got.grad, want, rtol=1e-5, atol=1e-6):
                print(f"rank {rank} step {step}: DDP gradient differs from the mean "
                      f"(max diff {(got.grad - want).abs().max().item():g})", file=sys.stderr)
                return 1
        opt.step()

    # Every rank must hold the same parameters: compare with rank 0's.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    for r, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            print(f"rank {rank}: parameters of rank {r} differ from rank 0's", file=sys.stderr)
            return 1
    print(f"rank {rank}/{world} (local {local_rank}) ok: {STEPS} DDP steps, gradients averaged, "
          f"parameters identical, checksum {flat.sum().item():.6f}")
    dist.barrier()
    # DDP's reducer goes before the group, and the group last through its Python handle, which
    # destroys it without the GIL (torch 1.13 could otherwise deadlock at exit: train.py says how).
    ddp = None
    group = dist.distributed_c10d._get_default_group()
    gc.collect()
    dist.destroy_process_group()
    del group
    return 0


if __name__ == "__main__":
    sys.exit(main())
