"""muster: checkpoints and the rank's side of a muster job, from Python.

    import muster
    state = muster.load("latest") if muster.resume_step() is not None else None
    ...
    muster.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})  # async
    muster.wait()                                          # the last save is committed

In-memory snapshots (a job spec with checkpoint.snapshot_every_steps: K):

    step, state, source = muster.resume()                  # snapshot, else volume, else fresh
    ...
    muster.maybe_snapshot(step, lambda: {"model": model.state_dict(), ...})  # every K steps
    with muster.maybe_hold(step, lambda: {...}):           # or: read in place, copying nothing
        loss.backward()                                    # (the state must not change here)

The package is found with nothing to install: `muster run` and agents put the build's package
directory on every rank's PYTHONPATH. The C++ core is muster._core (pybind11). docs/python.md
has the whole API.
"""

import threading as _threading

from muster import _core
from muster._core import (AbortedError, DataLossError, DeadlineExceededError, Error,
                          FailedPreconditionError, InternalError, InvalidArgumentError,
                          NotFoundError, RankEnv, UnavailableError)
from muster.checkpoint import (MAX_PICKLE_BYTES, Checkpointer, PerRank, RowShard, SaveHandle,
                               load_tensors)
from muster._state import shard_rows as _shard_rows
from muster.snapshot import Resume, Snapshotter, load_snapshot, resume

_default = None
_default_lock = _threading.Lock()


def checkpointer():
    """The process's Checkpointer, made from the env contract on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Checkpointer()
        return _default


def save(step, state):
    """Saves `state` as checkpoint `step` asynchronously; returns a SaveHandle (Checkpointer.save)."""
    return checkpointer().save(step, state)


def load(step="latest", **kwargs):
    """The state saved as `step` (Checkpointer.load)."""
    return checkpointer().load(step, **kwargs)


def wait():
    """Waits for the last save's commit (Checkpointer.wait)."""
    return checkpointer().wait()


def resume_step():
    """The step to resume from (MUSTER_RESUME_STEP, else the newest committed), or None."""
    return checkpointer().resume_step()


_snapshotter = None


def snapshotter():
    """The process's Snapshotter (in-memory snapshots), made from the env contract on first
    use."""
    global _snapshotter
    with _default_lock:
        if _snapshotter is None:
            _snapshotter = Snapshotter()
        return _snapshotter


def snapshot_every():
    """Every how many steps the job snapshots into its agents' memory
    (MUSTER_SNAPSHOT_EVERY, the job spec's checkpoint.snapshot_every_steps); 0 when it does not
    (or the agent has no snapshot memory)."""
    e = env()
    return (e.snapshot_every or 0) if e.snapshot_socket else 0


def snapshot(step, state):
    """Hands `state` to this node's agent as the in-memory snapshot of `step`, without waiting
    on the network (Snapshotter.snapshot)."""
    return snapshotter().snapshot(step, state)


def maybe_snapshot(step, state):
    """snapshot(step, state) when `step` is a multiple of snapshot_every(); `state` may be a
    function returning it. Returns whether a snapshot was taken (Snapshotter.maybe_snapshot)."""
    return snapshotter().maybe_snapshot(step, state)


def maybe_hold(step, state):
    """A block during which this node's agent reads `state` (or what the function `state`
    returns) as the snapshot of `step` out of this process's memory, when `step` is a multiple
    of snapshot_every(); nothing in the state may change inside it (Snapshotter.hold)."""
    return snapshotter().maybe_hold(step, state)


def resume_snapshot_step():
    """The step this attempt resumes from in memory (MUSTER_RESUME_SNAPSHOT_STEP), or None."""
    return env().resume_snapshot_step


def shard_rows(total_rows, rank=None, world_size=None):
    """(offset, rows) of this rank's rows when `total_rows` are split over the ranks the way
    numpy.array_split splits them (the split muster.load gives RowShard tensors)."""
    if rank is None or world_size is None:
        e = env()
        rank = e.rank if rank is None else rank
        world_size = e.world_size if world_size is None else world_size
    return _shard_rows(total_rows, rank, world_size)


def _job_dir(dir):
    if dir is not None:
        return str(dir)
    d = env().checkpoint_dir
    if not d:
        raise FailedPreconditionError("muster: MUSTER_CHECKPOINT_DIR is not set and no dir was "
                                      "given")
    return d


def adopt(source, step=None, dir=None):
    """Commits a finished Hugging Face checkpoint-N, DCP or torch.save directory `source` as a
    step of the job's checkpoint directory (`dir`, default MUSTER_CHECKPOINT_DIR), with per-block
    checksums, so it is verified and replicated like a native step. `step` defaults to N of
    checkpoint-N, else trainer_state.json's global_step. A half-written directory raises
    InvalidArgumentError naming what is missing. Returns {"step", "format", "files", "bytes"}."""
    return _core.adopt(str(source), _job_dir(dir), -1 if step is None else int(step))


def extract(step, dest, dir=None):
    """Writes the files of an adopted step back into `dest` (checked against the step's
    checksums), e.g. for Trainer.train(resume_from_checkpoint=dest)."""
    _core.extract(_job_dir(dir), int(step), str(dest))


def progress(step, total=None, loss=None, **metrics):
    """Reports progress to muster (`muster status`, the events): rank 0 sends
    `MUSTER_PROGRESS step=.. total=.. loss=.. name=value ...` on the control channel (stdout
    outside muster); other ranks do nothing. A metric `<x>_per_s` is shown as throughput."""
    import sys
    sys.stdout.flush()  # without a control channel the line goes to stdout: keep the order
    _core.progress(int(step), -1 if total is None else int(total),
                   float("nan") if loss is None else float(loss),
                   [(k, float(v)) for k, v in metrics.items()])


def notice_seen():
    """True once this rank has seen a preemption notice (the notice file, SIGTERM after
    install_sigterm_handler(), or on rank 0 the job store's key); cheap enough for every step.
    Fold it into a collective the step already does, or call agree_to_stop()."""
    return _core.notice_seen()


def agree_to_stop():
    """True on every rank at the same step once any rank has seen a notice: one allreduce of one
    value over muster's own communicator. Every rank must call it at the same steps."""
    return _core.agree_to_stop()


def install_sigterm_handler():
    """SIGTERM sets the notice flag instead of ending the process (then save and exit)."""
    _core.install_sigterm_handler()


def env():
    """This rank's env contract as one object (muster.RankEnv): rank, world_size, local_rank,
    local_world_size, node_rank, nnodes, job_id, attempt, checkpoint_dir, resume_step (None when
    starting fresh), preempt_file, ... Raises InvalidArgumentError naming a malformed variable."""
    return _core.rank_env()


__all__ = ["Error", "InvalidArgumentError", "NotFoundError", "DeadlineExceededError",
           "UnavailableError", "AbortedError", "FailedPreconditionError", "DataLossError",
           "InternalError", "Checkpointer", "SaveHandle", "RowShard", "PerRank", "save", "load",
           "wait", "resume_step", "env", "RankEnv", "adopt", "extract", "progress",
           "notice_seen", "agree_to_stop", "install_sigterm_handler", "shard_rows", "checkpointer",
           "load_tensors",
           "MAX_PICKLE_BYTES", "Snapshotter", "snapshotter", "snapshot_every", "snapshot",
           "maybe_snapshot", "maybe_hold", "load_snapshot", "resume", "Resume", "resume_snapshot_step"]
