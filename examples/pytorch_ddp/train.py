#!/usr/bin/env python3
"""A plain PyTorch DDP fine-tune that muster can run unchanged.

It uses the torchrun env contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) plus
muster's MUSTER_CHECKPOINT_DIR and MUSTER_RESUME_STEP, so the same script runs under `torchrun`,
`muster run -np N` and `muster submit`. Gloo on CPU, NCCL on GPU.

- A small byte-level GRU language model, fine-tuned on examples/data (or --data); --base loads
  initial weights from a state_dict saved by an earlier run (its step-N.pt's "model").
- AdamW, linear warmup then cosine decay, gradient clipping.
- Batches are a pure function of (seed, step, sample index): the global batch is the same at any
  world size, and the data position of a run is its step.
- Checkpoints, under muster (`muster run`, agents: the `muster` package is on PYTHONPATH and
  the job has a rendezvous store): muster.save of the model, the optimizer and the run's
  settings, asynchronous (training goes on while the step is written; the parameters are
  replicated, so each rank writes a share), checksummed, committed by all ranks together and
  announced to muster by the library. Resume: muster.load of MUSTER_RESUME_STEP, else the
  newest committed step.
- In-memory snapshots, when the job spec asks for them (checkpoint.snapshot_every_steps: K):
  every K steps each rank's agent reads the same state out of the rank's memory while its
  forward and backward passes run (muster.Snapshotter.maybe_hold: no copy in the rank, no wait
  on the network; the agents keep it in memory and on a peer node). After a
  node is lost, the coordinator resumes the gang from the newest step every rank's snapshot
  survived, and muster.resume() reads this rank's state back from its agent; it falls back to
  the volume's step only when the coordinator says so.
- Checkpoints elsewhere (plain torchrun): rank 0 writes MUSTER_CHECKPOINT_DIR/step-000000100.pt
  with torch.save into a temp file, fsyncs, renames, fsyncs the directory, then replaces LATEST
  the same way. Resume: MUSTER_RESUME_STEP=N resumes step N; "latest" or empty resumes the
  newest checkpoint if there is one, else starts fresh.
- SIGTERM (a preemption notice) or --notice-file (under muster: muster.notice_seen(), which also
  sees the job store's notice key): every rank agrees on the step through the loss allreduce,
  the ranks checkpoint it, and exit 3.
- Progress: `MUSTER_PROGRESS step=120 total=400 loss=1.8731 tokens_per_s=5321 lr=0.000812`
  (format: examples/README.md; under muster through muster.progress, on the control channel),
  and finally `MUSTER_DONE step=N param_digest=HEX`.
"""

import argparse
import contextlib
import gc
import hashlib
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import muster
except ImportError:  # not started by muster (plain torchrun): torch.save checkpoints
    muster = None

EXIT_PREEMPTED = 3
HERE = os.path.dirname(os.path.abspath(__file__))

_notice = False


def _on_sigterm(signum, frame):
    global _notice
    _notice = True


class CharGRU(nn.Module):
    def __init__(self, d_model, layers):
        super().__init__()
        self.emb = nn.Embedding(256, d_model)
        self.rnn = nn.GRU(d_model, d_model, num_layers=layers, batch_first=True)
        self.head = nn.Linear(d_model, 256)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.head(h)


def load_text(path):
    files = []
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            files += [os.path.join(root, n) for n in names]
        files.sort()
    elif os.path.isfile(path):
        files = [path]
    else:
        sys.exit(f"train.py: --data {path} is neither a file nor a directory")
    data = b"".join(open(f, "rb").read() + b"\n" for f in files)
    return torch.tensor(list(data), dtype=torch.long)


def batch(text, seed, step, first, count, seq_len):
    # The global batch of `step`, of which this rank takes samples [first, first+count).
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(text) - seq_len - 1, (first + count,), generator=g)[first:]
    x = torch.stack([text[s:s + seq_len] for s in starts.tolist()])
    y = torch.stack([text[s + 1:s + 1 + seq_len] for s in starts.tolist()])
    return x, y


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, write):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def step_path(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step-{step:09d}.pt")


def checkpoint_state(step, model, opt, args, world):
    return {
        "step": step,
        "world_size": world,
        "global_batch": args.batch,
        "seed": args.seed,
        "model": model.module.state_dict(),
        "optimizer": opt.state_dict(),
    }


def resume_step(ckpt_dir):
    want = os.environ.get("MUSTER_RESUME_STEP", "")
    latest = os.path.join(ckpt_dir, "LATEST")
    if want in ("", "latest"):
        if not os.path.exists(latest):
            return None
        want = open(latest).read().strip()
    if not want.isdigit():
        sys.exit(f"train.py: MUSTER_RESUME_STEP={want!r} is not 'latest' or a step number")
    return int(want)


class TorchSaveCheckpoints:
    """Plain torchrun: rank 0 torch.saves whole steps (no muster package or store)."""

    def __init__(self, ckpt_dir, rank):
        self.dir, self.rank = ckpt_dir, rank

    def resume_step(self):
        return resume_step(self.dir)

    def load(self, step, device):
        return torch.load(step_path(self.dir, step), map_location=device)

    def save(self, step, state):
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            write_atomically(step_path(self.dir, step), lambda f: torch.save(state, f))
            write_atomically(os.path.join(self.dir, "LATEST"),
                             lambda f: f.write(f"{step}\n".encode()))
            print(f"MUSTER_CHECKPOINT step={step}", flush=True)
        dist.barrier()

    def wait(self):
        pass


class MusterCheckpoints:
    """Under muster: asynchronous, checksummed steps through the muster package."""

    def __init__(self, ckpt_dir):
        self.ck = muster.Checkpointer(ckpt_dir)

    def resume_step(self):
        return self.ck.resume_step()

    def load(self, step, device):
        return self.ck.load(step, device=device)

    def save(self, step, state):
        self.ck.save(step, state)  # returns once the tensors are copied; the commit follows

    def wait(self):
        self.ck.wait()


def param_digest(model):
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def destroy_process_group():
    """Destroys the default group last, through its Python handle. Call it once nothing else
    (a DDP model and its reducer) holds the group.

    torch 1.13 (Debian's): a gloo group whose last owner is DDP's C++ reducer is destroyed with
    the GIL held, and it joins its worker threads; a worker that is just dropping the last
    collective's tensors needs the GIL to free them: a deadlock at exit (rank 1 hung about once
    in 70 runs). The group's Python handle releases the GIL while it destroys the group."""
    group = dist.distributed_c10d._get_default_group()
    gc.collect()  # a DDP model caught in a reference cycle lets its reducer go now
    dist.destroy_process_group()
    del group  # the last owner: destroyed here, without the GIL


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(HERE, "..", "data"))
    ap.add_argument("--base", help="a step-N.pt whose weights to start from")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="global batch, in sequences")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--notice-file", default=os.environ.get("MUSTER_PREEMPT_FILE", ""))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step-delay", type=float, default=0.0,
                    help="seconds to sleep after each step: a longer step, without changing the "
                         "result (tests use it so that a notice lands mid-run)")
    args = ap.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ckpt_dir = os.environ.get("MUSTER_CHECKPOINT_DIR", "")
    if not ckpt_dir:
        sys.exit("train.py: set MUSTER_CHECKPOINT_DIR")
    if args.batch % world:
        sys.exit(f"train.py: --batch {args.batch} must be a multiple of WORLD_SIZE {world}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")

    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    signal.signal(signal.SIGTERM, _on_sigterm)

    torch.manual_seed(args.seed)
    text = load_text(args.data)
    net = CharGRU(args.d_model, args.layers)
    if args.base:
        net.load_state_dict(torch.load(args.base, map_location="cpu")["model"])
    net.to(device)
    model = DDP(net, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay)

    if muster is not None and (world == 1 or muster.env().has_rendezvous):
        checkpoints = MusterCheckpoints(ckpt_dir)
    else:
        checkpoints = TorchSaveCheckpoints(ckpt_dir, rank)
    under_muster = isinstance(checkpoints, MusterCheckpoints)
    if under_muster:
        muster.install_sigterm_handler()  # SIGTERM is a notice: checkpoint, then stop
    snapshots = muster.Snapshotter() if under_muster else None
    if rank == 0:
        kind = "muster" if under_muster else "torch.save"
        print(f"checkpoints: {kind} in {ckpt_dir}", flush=True)
        if snapshots is not None and snapshots.enabled:
            print(f"snapshots: every {snapshots.every} steps into the agents' memory", flush=True)
    start = 0
    if under_muster:  # the agent's in-memory snapshot when the attempt resumes from one
        step0, state, source = muster.resume(checkpoints.ck, device=device)
    else:
        step0, source = checkpoints.resume_step(), "volume"
        state = checkpoints.load(step0, device) if step0 is not None else None
    if step0 is not None:
        if state["global_batch"] != args.batch:
            sys.exit(f"train.py: checkpoint {step0} used --batch {state['global_batch']}")
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = step0
        if rank == 0:
            where = "the in-memory snapshot" if source == "snapshot" else "the volume"
            print(f"resumed from step {start} from {where} (saved at world size "
                  f"{state['world_size']}, now {world})", flush=True)

    local = args.batch // world
    t0, window = time.time(), 0
    preempted = False
    step = start
    while step < args.steps:
        torch.manual_seed(args.seed * 7_919 + step * 104_729 + rank)
        x, y = batch(text, args.seed, step, rank * local, local, args.seq_len)
        x, y = x.to(device), y.to(device)
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        # Every K steps the agent reads the state (after `step` updates) straight out of this
        # process while the forward and backward passes run: they only read the parameters and
        # the optimizer's moments (this model has no buffers that a forward pass writes), and
        # the block's end waits for the read before opt.step() changes them.
        held = contextlib.nullcontext()
        if snapshots is not None and step > start:  # `start` itself is what we resumed from
            held = snapshots.maybe_hold(step,
                                        lambda: checkpoint_state(step, model, opt, args, world))
        with held:
            loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        window += 1
        if args.step_delay > 0:
            time.sleep(args.step_delay)
        if under_muster:  # SIGTERM, the notice file, or (rank 0) the job store's key
            notice = muster.notice_seen()
        else:
            notice = _notice or bool(args.notice_file and os.path.exists(args.notice_file))
        stats = torch.tensor([loss.item(), 1.0 if notice else 0.0], device=device)
        dist.all_reduce(stats)
        mean_loss, stop = stats[0].item() / world, stats[1].item() > 0
        if rank == 0 and (step % args.log_every == 0 or step == args.steps or stop):
            tps = window * args.batch * args.seq_len / max(time.time() - t0, 1e-9)
            if under_muster:
                muster.progress(step, args.steps, loss=mean_loss, tokens_per_s=tps, lr=lr)
            else:
                print(f"MUSTER_PROGRESS step={step} total={args.steps} loss={mean_loss:.4f} "
                      f"tokens_per_s={tps:.0f} lr={lr:.6g}", flush=True)
            t0, window = time.time(), 0
        if step % args.ckpt_every == 0 or step == args.steps or stop:
            checkpoints.save(step, checkpoint_state(step, model, opt, args, world))
        if stop:
            # Every rank says where it stopped (the ranks agree on it through the allreduce).
            print(f"rank {rank}: preemption notice: checkpointed step {step} and stopping",
                  file=sys.stderr, flush=True)
            if rank == 0:
                print(f"MUSTER_PREEMPTED step={step}", flush=True)
            preempted = True
            break
    checkpoints.wait()  # the last step is committed (and announced) before the exit
    if rank == 0:
        print(f"MUSTER_DONE step={step} preempted={int(preempted)} "
              f"param_digest={param_digest(model.module)}", flush=True)
    model = None  # DDP's reducer goes before the group: see destroy_process_group below
    destroy_process_group()
    return EXIT_PREEMPTED if preempted else 0


if __name__ == "__main__":
    sys.exit(main())
