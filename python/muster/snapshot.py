"""In-memory peer snapshots from Python (the job spec's checkpoint.snapshot_every_steps).

    snap = muster.Snapshotter()               # .enabled is False outside such a job
    r = muster.resume()                       # (step, state, source): snapshot, volume or fresh
    ...
    for step in range(start, total):
        train_one_step()
        snap.maybe_snapshot(step + 1, lambda: {"model": model.state_dict(),
                                               "optim": opt.state_dict()})

A snapshot holds exactly what muster.save saves of a state (tensors, numpy arrays and scalars,
the picklable rest, RowShard and PerRank layouts), in the payload C++ ranks send
(checkpoint/snapshot_state.h), to this node's agent, which keeps it in memory and forwards a copy
to an agent on another node. When a node is lost, the coordinator resumes the gang from the
newest step every rank's snapshot survived (MUSTER_RESUME_SNAPSHOT_STEP): resume() then reads
this rank's snapshot back from its own agent; otherwise it loads the volume's step
(MUSTER_RESUME_STEP), or starts fresh.

Cost to the training loop: one copy of the state into a buffer reused from snapshot to snapshot,
with the GIL released (CUDA tensors first go to reused host buffers: one device-to-host copy).
The checksum and the send run on a C++ thread; a snapshot still waiting to be sent when the next
one is taken is replaced by it (recovery wants the newest step), so training never waits on the
agent. A refusal by the agent (e.g. snapshots that do not fit its memory limit) is logged by
that thread and reported by flush().

Or the rank copies nothing at all (CUDA tensors still go to host buffers first): the agent reads
the state straight out of this process while the forward and backward passes run, and the
optimizer step waits until it has:

    for step in range(start, total):
        with snap.maybe_hold(step, lambda: {"model": model.state_dict(),
                                            "optim": opt.state_dict()}):
            loss = model(batch).loss
            loss.backward()
        opt.step()                            # the state changes only after the block

Nothing in the state may change inside such a block (see Snapshotter.hold). The agent reads
with process_vm_readv, as the parent of the ranks it starts; where it cannot (a rank started by
another launcher under a ptrace scope that forbids it), it says so once and the snapshots are
copied as snapshot() copies them, by the same calls.

A snapshot restore that fails raises (NotFoundError, DataLossError, ...): the rank must not go
on from another step than its peers, so let the exception end it (the attempt fails like any
rank failure).
"""

import collections
import contextlib
import logging
import pickle
import threading

from muster import _core
from muster import _state
from muster._state import loaded_torch
from muster.checkpoint import (_METADATA_MAGIC, _collect_leaves, _describe, _empty, _pointer,
                               _storage)


_log = logging.getLogger("muster.snapshot")


def _timeout(seconds, what):
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not 0 <= seconds <= 86400):
        raise _core.InvalidArgumentError(f"{what}: timeout must be a number of seconds in "
                                         f"[0, 86400], not {seconds!r}")
    return float(seconds)


def _int_step(step, what):
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _core.InvalidArgumentError(f"{what}: step must be an int >= 0, not {step!r}")
    return step


class Snapshotter:
    """This rank's in-memory snapshots to its node's agent.

    Made from the env contract (MUSTER_SNAPSHOT_EVERY, MUSTER_SNAPSHOT_SOCKET, the job, attempt,
    rank and world size). `enabled` is False when the job or its agent has no snapshots (then
    maybe_snapshot does nothing and snapshot raises). Thread-safety: call it from the training
    thread (one snapshot at a time; the send runs on its own thread)."""

    def __init__(self, env=None):
        e = env if env is not None else _core.rank_env()
        self.every = e.snapshot_every or 0
        self.rank, self.world_size = e.rank, e.world_size
        self._sender = None
        if self.every > 0 and e.snapshot_socket:
            self._sender = _core.SnapshotSender(e.snapshot_socket, e.job_id, e.attempt, e.rank,
                                                e.world_size)
        self._last = None
        self._host = {}  # tensor name -> reused host buffer for a CUDA tensor
        self._lock = threading.Lock()
        self._release_timeout = 10.0
        self.given_up = 0  # in-place snapshots given up by release()

    @property
    def release_timeout(self):
        """How long (s) release() and a hold block's end wait for the agent's read: 10 by
        default, in [0, 86400]."""
        return self._release_timeout

    @release_timeout.setter
    def release_timeout(self, seconds):
        self._release_timeout = _timeout(seconds, "muster.Snapshotter.release_timeout")

    @property
    def enabled(self):
        return self._sender is not None

    def due(self, step):
        """True when `step` is one the job snapshots (a multiple of snapshot_every)."""
        return self.enabled and step % self.every == 0

    def snapshot(self, step, state):
        """Copies `state` (what muster.save takes) as this rank's snapshot of `step` and returns;
        the agent gets it in the background. Steps must increase from call to call. Raises
        FailedPreconditionError when snapshots are not enabled, TypeError /
        InvalidArgumentError for a state muster.save would refuse."""
        self._take(step, state, "muster.snapshot", in_place=False)

    def _take(self, step, state, what, in_place):
        if not self.enabled:
            raise _core.FailedPreconditionError(
                f"{what}: this job has no in-memory snapshots (set the job spec's "
                "checkpoint.snapshot_every_steps; the agent needs --snapshot-memory-mb)")
        _int_step(step, what)
        with self._lock:
            if self._last is not None and step <= self._last:
                raise _core.InvalidArgumentError(
                    f"{what}: step {step} is not after the last snapshot's ({self._last})")
            self._release_locked(self.release_timeout)  # the previous in-place one, if held
            refs, keep, metadata, any_cuda = _describe(state, self.rank, self.world_size, what)
            if any_cuda:
                self._to_host(refs, keep)
            if in_place:
                # The sender holds `keep` (every object the refs point into) until release.
                self._sender.snapshot_in_place(step, refs, metadata, keep)
            else:
                self._sender.snapshot(step, refs, metadata)
            self._last = step
        del keep

    def hold(self, step, state):
        """A block during which this node's agent reads `state` as the snapshot of `step`
        straight out of this process's memory; leaving it waits until the agent has read it
        (release). The training thread copies nothing (snapshot() copies the state once).

        Nothing in `state` may change until the block ends: run inside it what only reads the
        state, typically the forward and backward passes (gradients are not part of it), and
        the optimizer step after it. A model whose forward pass writes its own state (the
        running statistics of BatchNorm in train mode; DDP with broadcast_buffers, its default,
        writes every buffer at each forward) must use snapshot() instead, or keep those buffers
        out of `state`: the agent could read them mid-update, and nothing would notice. CUDA
        tensors are first copied to reused pinned host buffers on this thread, as snapshot()
        does (the agent reads those).

        Raises as snapshot() does; steps must increase from snapshot to snapshot. The value
        bound by `as` is True."""
        return _Hold(self, step, state)

    def maybe_hold(self, step, state):
        """hold(step, state) when due(step), else a block that does nothing; `state` may be a
        function returning it (called only when due). The value bound by `as` says whether a
        snapshot was taken."""
        if not self.due(step):
            return contextlib.nullcontext(False)
        return self.hold(step, state() if callable(state) else state)

    def snapshot_in_place(self, step, state):
        """hold() without the block: the agent reads `state` until release() is called, which
        must come before anything in it changes (and comes first in the next snapshot)."""
        self._take(step, state, "muster.snapshot_in_place", in_place=True)

    def release(self, timeout=None):
        """Waits until the agent has read the in-place snapshot, at most `timeout` s
        (release_timeout by default); then gives it up: the agent keeps it only if its read was
        already done, training goes on (logged; counted in given_up). Returns False when it was
        given up, True otherwise (also when none was held, and when the agent read it but then
        refused to keep it: flush() raises that refusal). An invalid `timeout` raises
        InvalidArgumentError, after releasing with release_timeout: the state is never left
        held by a call that raised."""
        if not self.enabled:
            return True
        with self._lock:
            if timeout is None:
                return self._release_locked(self._release_timeout)
            try:
                t = _timeout(timeout, "muster.Snapshotter.release")
            except _core.InvalidArgumentError:
                self._release_locked(self._release_timeout)
                raise
            return self._release_locked(t)

    def _release_locked(self, timeout):
        if not self._sender.held:
            return True
        why = self._sender.release(float(timeout))
        if why:
            self.given_up += 1
            _log.warning("muster: in-memory snapshot of step %s given up: %s", self._last, why)
            return False
        return True

    @property
    def in_place(self):
        """Whether the agent reads in-place snapshots out of this process (False once it said
        it cannot: they are then copied)."""
        return self.enabled and self._sender.in_place

    def maybe_snapshot(self, step, state):
        """snapshot(step, state) when due(step); `state` may be a function that returns it
        (called only then). Returns whether a snapshot was taken."""
        if not self.due(step):
            return False
        self.snapshot(step, state() if callable(state) else state)
        return True

    def flush(self, timeout=10.0):
        """Waits until the last snapshot is handed to the agent (DeadlineExceededError after
        `timeout` s) and raises the agent's refusal or the channel's error, if any. An in-place
        snapshot still held is released first (waiting up to `timeout` for that too)."""
        if self.enabled:
            self.release(timeout)
            self._sender.flush(float(timeout))

    @property
    def sent(self):
        """Snapshots the agent has kept."""
        return self._sender.sent if self.enabled else 0

    @property
    def replaced(self):
        """Snapshots replaced by a newer one before they were sent."""
        return self._sender.replaced if self.enabled else 0

    def _to_host(self, refs, keep):
        # Snapshots hold host memory: each CUDA tensor goes to a host buffer kept for the next
        # snapshot (pinned, so the copies run at full speed), then the state is copied as usual.
        # keep[i] is the object refs[i] points into (_describe).
        torch = loaded_torch()
        for i, r in enumerate(refs):
            if r.memory != "cuda":
                continue
            src = keep[i]
            buf = self._host.get(r.name)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                self._host[r.name] = buf
            buf.copy_(src, non_blocking=True)
            r.data, r.memory = buf.data_ptr(), "host"
            keep[i] = buf
        torch.cuda.synchronize()

class _Hold:
    """Snapshotter.hold's block."""

    def __init__(self, snapshotter, step, state):
        self._snap, self._step, self._state = snapshotter, step, state

    def __enter__(self):
        state, self._state = self._state, None
        self._snap.snapshot_in_place(self._step, state)
        return True

    def __exit__(self, *exc):
        self._snap.release()
        return False


def _leaf_output(leaf, entry, step):
    """(an empty array or tensor for `leaf`, its _storage) once `entry` (the payload index's
    description of the same name) holds exactly what the leaf says: its dtype and box. Checked
    before the destination is allocated: a lying skeleton costs no memory."""
    what = f"muster.load_snapshot: step {step}: tensor '{leaf.name}'"
    shape = list(leaf.shape)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _core.DataLossError(f"{what} has a malformed shape {shape!r}")
    if leaf.layout == "per_rank":
        shape = [1] + shape
    elif leaf.layout not in ("rows", "replicated"):
        raise _core.DataLossError(f"{what} has an unknown layout {leaf.layout!r}")
    where = f"muster.load_snapshot: step {step}"
    dtype, _, extra = _storage(leaf, _empty(leaf, [0] * len(shape), None, where))
    want = shape + ([extra] if extra is not None else [])
    if entry["dtype"] != dtype or list(entry["lengths"]) != want:
        raise _core.DataLossError(f"{what} is held as {entry['dtype']}{list(entry['lengths'])}, "
                                  f"its state says {dtype}{want}")
    out = _empty(leaf, shape, None, where)
    return out, _storage(leaf, out)


def restore_payload(payload, step, *, device=None, allow_pickle=False):
    """The state held by `payload` (a _core.SnapshotPayload), as muster.save's state. Every
    tensor is checked against the payload's index (dtype and box) before a byte is copied;
    DataLossError names what does not match."""
    meta = payload.metadata()
    if not meta.startswith(_METADATA_MAGIC):
        raise _core.FailedPreconditionError(
            f"muster.load_snapshot: the snapshot of step {step} was not taken by "
            "muster.snapshot (it holds no Python state)")
    blob = meta[len(_METADATA_MAGIC):]
    try:
        skeleton = pickle.loads(blob) if allow_pickle else _state.restricted_loads(blob)
    except _state.RefusedGlobal as e:
        raise _core.FailedPreconditionError(f"muster.load_snapshot: step {step}: {e}") from None
    except Exception as e:  # a checksummed payload whose pickle is broken: not ours
        raise _core.DataLossError(f"muster.load_snapshot: step {step}: the state's structure "
                                  f"does not unpickle ({type(e).__name__}: {e})") from None
    index = payload.tensors()
    leaves = []
    _collect_leaves(skeleton, leaves)
    values, requests, keep = {}, [], []
    for leaf in leaves:
        entry = index.get(leaf.name)
        if entry is None:
            raise _core.DataLossError(f"muster.load_snapshot: step {step} has no tensor "
                                      f"'{leaf.name}' though its state names it")
        out, (dtype, obj, _) = _leaf_output(leaf, entry, step)
        r = _core.Tensor()
        r.name, r.dtype = leaf.name, dtype
        r.offsets, r.lengths = list(entry["offsets"]), list(entry["lengths"])
        r.data, r.memory = _pointer(obj)
        values[leaf.name] = out
        requests.append(r)
        keep.append(obj)
    payload.restore(requests)
    for leaf in leaves:
        v = values[leaf.name]
        if leaf.kind == "npscalar":
            v = v[()]
        elif leaf.layout == "per_rank":
            v = v[0]
        if leaf.kind == "torch" and device is not None:
            v = v.to(device)
        values[leaf.name] = v
    return _state.unflatten(skeleton, values)


def load_snapshot(step=None, attempt=None, *, device=None, allow_pickle=False):
    """This rank's state from the in-memory snapshot of `step` of `attempt` that its node's
    agent holds; by default the one the attempt resumes from (MUSTER_RESUME_SNAPSHOT_STEP of
    MUSTER_RESUME_SNAPSHOT_ATTEMPT). device: where torch tensors go ("cpu" by default).

    Raises FailedPreconditionError when the attempt does not resume from a snapshot (and no
    step is given) or the rank has no snapshot socket; NotFoundError when the agent holds no
    such snapshot; DataLossError for bytes that fail their checksum or a malformed payload."""
    e = _core.rank_env()
    if step is None:
        step, attempt = e.resume_snapshot_step, e.resume_snapshot_attempt
        if step is None:
            raise _core.FailedPreconditionError(
                "muster.load_snapshot: this attempt does not resume from an in-memory snapshot "
                "(MUSTER_RESUME_SNAPSHOT_STEP is unset)")
    _int_step(step, "muster.load_snapshot")
    if attempt is None:
        attempt = e.resume_snapshot_attempt if e.resume_snapshot_attempt is not None \
            else e.attempt
    if not e.snapshot_socket:
        raise _core.FailedPreconditionError(
            "muster.load_snapshot: no snapshot socket (MUSTER_SNAPSHOT_SOCKET): the job or its "
            "agent has no in-memory snapshots")
    payload = _core.fetch_snapshot(e.snapshot_socket, e.job_id, int(attempt), e.rank,
                                   e.world_size, step)
    return restore_payload(payload, step, device=device, allow_pickle=allow_pickle)


Resume = collections.namedtuple("Resume", ["step", "state", "source"])
Resume.__doc__ = """Where an attempt starts: step (None when fresh), state (None when fresh) and
source: "snapshot" (an agent's memory), "volume" (a committed checkpoint) or "fresh"."""


def resume(checkpointer=None, *, device=None, allow_pickle=False):
    """Where this attempt starts, as a Resume(step, state, source): from this rank's in-memory
    snapshot when the coordinator resumes the attempt from one (MUSTER_RESUME_SNAPSHOT_STEP),
    else from the volume (checkpointer.resume_step(), checkpointer defaulting to
    muster.checkpointer()), else fresh. A failed snapshot restore raises; it never falls back to
    the volume on its own, since the other ranks resume from the snapshot's step."""
    e = _core.rank_env()
    if e.resume_snapshot_step is not None:
        state = load_snapshot(device=device, allow_pickle=allow_pickle)
        return Resume(e.resume_snapshot_step, state, "snapshot")
    if checkpointer is None:
        import muster
        checkpointer = muster.checkpointer()
    step = checkpointer.resume_step()
    if step is None:
        return Resume(None, None, "fresh")
    return Resume(step, checkpointer.load(step, device=device, allow_pickle=allow_pickle),
                  "volume")


__all__ = ["Snapshotter", "load_snapshot", "restore_payload", "resume", "Resume"]
