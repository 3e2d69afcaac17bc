"""Checkpoints from Python through muster's C++ checkpointer.

    ck = muster.Checkpointer()             # MUSTER_CHECKPOINT_DIR, RANK, WORLD_SIZE, the store
    h = ck.save(step, {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3})
    ...                                    # training goes on while the step is written
    state = ck.load("latest")              # the same structure, bit-exact

(muster.save / muster.load / muster.wait use one Checkpointer made from the environment.)

What is stored where:
- every torch tensor, numpy array and numpy scalar goes into the shard files as a tensor of the
  step (one name per path: "model/fc.weight"), checksummed per block, exactly as C++ saves;
  dtypes the format does not name (int16, complex, float8, big-endian, ...) are stored as their
  raw bytes (u8, one more dimension of itemsize) and come back as the original dtype;
- everything else (ints, floats, strings, the nesting itself) is pickled into this rank's user
  metadata in the MANIFEST (the manifest is checksummed and replicated with the step, and small
  by contract: at most MAX_PICKLE_BYTES; bigger data belongs in an array).

Tensors are replicated (every rank holds the same, one rank stores it) unless wrapped in
muster.RowShard (this rank's rows of a bigger tensor; loadable at any world size) or
muster.PerRank (each rank's own copy; loadable at the same world size only).

Save is asynchronous: it returns once the bytes are copied into staging memory (the GIL released
during the copy); later in-place updates do not change the saved step. The write, fsync and
commit run on the C++ writer thread. The returned SaveHandle waits for the commit; rank 0
announces each commit to muster (on the control channel: the agent records it and replicates
it) by itself.
"""

import atexit
import pickle
import sys
import threading

from muster import _core
from muster import _state
from muster._state import Leaf, PerRank, RowShard, import_torch, loaded_torch, np, shard_rows

MAX_PICKLE_BYTES = 16 << 20
_METADATA_MAGIC = b"muster-py/1\n"

_NUMPY_DTYPES = {"<f4": "f32", "<f8": "f64", "<f2": "f16", "<i4": "i32", "<i8": "i64",
                 "|u1": "u8", "|i1": "i8", "|b1": "bool"}
_TORCH_DTYPES = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
                 "int32": "i32", "int64": "i64", "uint8": "u8", "int8": "i8", "bool": "bool"}

class SaveHandle:
    """The commit of one muster save. wait() returns once the step is committed on every rank
    (or raises the error that stopped it); done() never blocks."""

    def __init__(self, step):
        self.step = step
        self._event = threading.Event()
        self._error = None

    def _finish(self, error):
        self._error = error
        self._event.set()

    def done(self):
        return self._event.is_set()

    def wait(self, timeout=None):
        if not self._event.wait(timeout):
            raise _core.DeadlineExceededError(
                f"muster: step {self.step} was not committed within {timeout} s")
        if self._error is not None:
            raise self._error

    def __repr__(self):
        state = "pending" if not self.done() else ("failed" if self._error else "committed")
        return f"<muster.SaveHandle step={self.step} {state}>"


def _storage(leaf, x):
    """(muster dtype, contiguous object whose memory is the bytes, extra trailing dim or None)."""
    if leaf.kind == "torch":
        t = x.detach()
        if not t.is_contiguous():
            t = t.contiguous()  # the one copy a strided view costs
        d = _TORCH_DTYPES.get(leaf.dtype)
        if d is not None:
            return d, t, None
        return "u8", t, t.element_size()
    a = np.asarray(x)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    d = _NUMPY_DTYPES.get(leaf.dtype)
    if d is not None:
        return d, a, None
    return "u8", a, a.dtype.itemsize


def _pointer(obj):
    if _state.is_tensor(obj):
        return obj.data_ptr(), ("cuda" if obj.is_cuda else "host")
    return obj.__array_interface__["data"][0], "host"


def _describe(state, rank, world_size, what):
    """(refs, keep, metadata, any_cuda) of a save or snapshot of `state` by `rank` of
    `world_size`: the _core.Tensor descriptions, the objects whose memory they point to (keep
    them alive for the call), the metadata (the pickled skeleton) and whether a tensor is on a
    GPU. Raises TypeError / InvalidArgumentError as Checkpointer.save documents."""
    skeleton, leaves = _state.flatten(state, what)
    refs, keep = [], []
    any_cuda = False
    for leaf, x, wrapper in leaves:
        dtype, obj, extra = _storage(leaf, x)
        keep.append(obj)
        ptr, memory = _pointer(obj)
        any_cuda |= memory == "cuda"
        r = _core.Tensor()
        r.name, r.dtype, r.data, r.memory = leaf.name, dtype, ptr, memory
        shape = list(leaf.shape)
        if leaf.layout == "rows":
            rows = shape[0]
            if wrapper.offset is None and wrapper.total_rows is None:
                offset, total = rank * rows, world_size * rows
            elif wrapper.offset is None:
                total = int(wrapper.total_rows)
                offset, want = shard_rows(total, rank, world_size)
                if want != rows:
                    raise _core.InvalidArgumentError(
                        f"{what}: RowShard '{leaf.name}' has {rows} rows on rank "
                        f"{rank}, but {total} rows split over {world_size} ranks "
                        f"give it {want} (pass offset= for another split)")
            else:
                offset, total = int(wrapper.offset), int(wrapper.total_rows)
            if not 0 <= offset <= offset + rows <= total:
                raise _core.InvalidArgumentError(
                    f"{what}: RowShard '{leaf.name}': rows [{offset}, {offset + rows}) "
                    f"are not inside a tensor of {total} rows")
            r.shape = [total] + shape[1:]
            r.offsets = [offset] + [0] * (len(shape) - 1)
            r.lengths = shape
        elif leaf.layout == "per_rank":
            r.shape = [world_size] + shape
            r.offsets = [rank] + [0] * len(shape)
            r.lengths = [1] + shape
        else:
            r.shape = shape
            r.replicated = True
        if extra is not None:
            r.shape = r.shape + [extra]
            if r.offsets:
                r.offsets = r.offsets + [0]
                r.lengths = r.lengths + [extra]
        refs.append(r)
    try:
        blob = pickle.dumps(skeleton, protocol=4)
    except Exception as e:
        found = _state.find_unpicklable(skeleton)
        where = f"{found[0]} (a {found[1]})" if found else "the state"
        raise TypeError(f"{what}: {where} cannot be saved: it is not a tensor, a numpy "
                        f"array or a picklable object ({e})") from None
    if len(blob) > MAX_PICKLE_BYTES:
        raise _core.InvalidArgumentError(
            f"{what}: the non-tensor part of the state pickles to {len(blob)} bytes, "
            f"over {MAX_PICKLE_BYTES}: keep big data in tensors or numpy arrays")
    return refs, keep, _METADATA_MAGIC + blob, any_cuda


class Checkpointer:
    """Saves and loads nested training state as muster checkpoints in `dir`.

    dir, rank, world_size default to the env contract (MUSTER_CHECKPOINT_DIR, RANK, WORLD_SIZE).
    At world size > 1 the ranks commit through the job's rendezvous store (MUSTER_RDZV_ENDPOINT,
    MUSTER_RDZV_KEY), which `muster run` and agents provide. Thread-safety: one save at a time
    (a save waits for the previous one's commit); load may run beside a save.

    direct_io, io_threads and overlap_snapshot are checkpoint::CheckpointerOptions'
    (O_DIRECT shard writes; writer threads; start writing each chunk as soon as the snapshot has
    copied it, which shortens the save where spare cores exist and lengthens the stall where
    they do not).
    """

    def __init__(self, dir=None, rank=None, world_size=None, *, direct_io=True, io_threads=4,
                 overlap_snapshot=False):
        env = _core.rank_env() if dir is None or rank is None or world_size is None else None
        if dir is None:
            dir = env.checkpoint_dir
            if not dir:
                raise _core.FailedPreconditionError(
                    "muster: MUSTER_CHECKPOINT_DIR is not set and no dir was given: the job has "
                    "no checkpoint directory (a job spec's checkpoint.volume, or "
                    "`muster run --checkpoint-dir DIR`)")
        self.rank = env.rank if rank is None else rank
        self.world_size = env.world_size if world_size is None else world_size
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise _core.InvalidArgumentError(
                f"muster: rank {self.rank} is not in a world of {self.world_size} ranks")
        # In a job (this process's own rank and world size) the checkpointer comes from the
        # job's context: its one store connection, and commits announced to the agent or
        # `muster run` on the control channel by the C++ side. Otherwise (a tool loading as some
        # other rank) a plain one: loading needs no store; saving at world size > 1 does.
        e = env or _core.rank_env()
        own = self.rank == e.rank and self.world_size == e.world_size
        self._no_store = not own and self.world_size > 1
        if own and (self.world_size == 1 or e.has_rendezvous):
            self._ck = _core.Checkpointer.from_context(str(dir), direct_io, io_threads,
                                                       overlap_snapshot)
        else:
            self._no_store = self.world_size > 1
            self._ck = _core.Checkpointer(str(dir), 0, 1, False, direct_io, io_threads,
                                          overlap_snapshot)
        self.dir = self._ck.dir
        self._lock = threading.Lock()
        self._pending = None
        atexit.register(self._at_exit)

    # -- saving --------------------------------------------------------------------------------

    def save(self, step, state):
        """Snapshots `state` as checkpoint `step` and returns a SaveHandle; the write and commit
        go on in the background. Every rank calls save with the same step and the same
        structure. Raises TypeError for an object that cannot be saved (naming where it is in
        the state), ValueError (InvalidArgumentError) for a bad step or shard."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise _core.InvalidArgumentError(f"muster.save: step must be an int >= 0, not {step!r}")
        if self._no_store:
            raise _core.FailedPreconditionError(
                f"muster.save: world size {self.world_size} commits through the job's "
                "rendezvous store, and MUSTER_RDZV_ENDPOINT is not set: run under `muster run` "
                "or an agent")
        refs, keep, metadata, any_cuda = _describe(state, self.rank, self.world_size,
                                                   "muster.save")
        if any_cuda:
            loaded_torch().cuda.synchronize()  # the copy runs on muster's stream, after the producers
        return self._submit(step, refs, metadata, keep)

    def _submit(self, step, refs, metadata, keep):
        """Hands `refs` (whose memory `keep` holds) to the C++ checkpointer; returns the handle
        whose commit a background thread awaits and announces."""
        if self._no_store:
            raise _core.FailedPreconditionError(
                f"muster.save: world size {self.world_size} commits through the job's "
                "rendezvous store, and MUSTER_RDZV_ENDPOINT is not set: run under `muster run` "
                "or an agent")
        with self._lock:
            self._finish_pending()
            self._ck.save(step, refs, metadata)
            handle = SaveHandle(step)
            self._pending = handle
            threading.Thread(target=self._await_commit, args=(handle,), daemon=True,
                             name=f"muster-commit-{step}").start()
        del keep
        return handle

    def _await_commit(self, handle):
        try:
            self._ck.wait()
        except _core.Error as e:
            handle._finish(e)
            return
        handle._finish(None)  # rank 0's C++ side has announced the commit

    def _finish_pending(self):
        # A save waits for the previous commit (one save in flight, as in C++). Its error stays
        # with its handle; this save goes ahead.
        if self._pending is not None:
            self._pending._event.wait()
            self._pending = None

    def wait(self):
        """Waits for the last save's commit; raises its error."""
        with self._lock:
            pending = self._pending
        if pending is not None:
            pending.wait()

    def saving(self):
        """True while a save is being written (never blocks)."""
        with self._lock:
            return self._pending is not None and not self._pending.done()

    def _at_exit(self):
        # A process that returns from main with a save in flight still commits (and announces)
        # it before the interpreter goes away.
        try:
            self.wait()
        except _core.Error as e:
            sys.stderr.write(f"muster: the last checkpoint was not committed: {e}\n")

    # -- loading -------------------------------------------------------------------------------

    def latest_step(self):
        """The newest committed step in the directory, or None."""
        return self._ck.latest_step()

    def resume_step(self):
        """MUSTER_RESUME_STEP when set (the coordinator's newest step on this provider), else
        the newest committed step here, else None (start fresh)."""
        step = _core.rank_env().resume_step
        if step is not None:
            return step
        return self.latest_step()

    def load(self, step="latest", *, device=None, allow_pickle=False):
        """Returns the state saved as `step` ("latest": resume_step()), bit-exact, with this
        rank's rows of RowShard tensors at the current world size (numpy.array_split's split).

        device: where torch tensors are made ("cpu" by default; "cuda" or a torch.device).
        allow_pickle: unpickle arbitrary classes from the state (only for trusted checkpoints).
        Raises NotFoundError for a step that does not exist, InvalidArgumentError for a world
        size the shards cannot map to, DataLossError for bytes that fail their checksum."""
        if step == "latest":
            step = self.resume_step()
            if step is None:
                raise _core.NotFoundError(f"muster.load: no committed checkpoint in {self.dir}")
        elif not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise _core.InvalidArgumentError(
                f"muster.load: step must be 'latest' or an int >= 0, not {step!r}")
        manifest = self._ck.read_manifest(step)
        skeleton = self._skeleton(manifest, allow_pickle)
        entries = {t["name"]: t for t in manifest["tensors"]}
        requests, values, keep = [], {}, []
        leaves = []
        _collect_leaves(skeleton, leaves)
        for leaf in leaves:
            entry = entries.get(leaf.name)
            if entry is None:
                raise _core.DataLossError(f"muster.load: step {step} has no tensor '{leaf.name}' "
                                          "though its state names it")
            out, r = self._request(step, leaf, entry, manifest, device)
            values[leaf.name] = out
            if r is not None:
                keep.append(r[1])
                requests.append(r[0])
        self._ck.restore(step, requests)
        for leaf in leaves:
            if leaf.kind == "npscalar":
                values[leaf.name] = values[leaf.name][()]
            elif leaf.layout == "per_rank":
                values[leaf.name] = values[leaf.name][0]
        return _state.unflatten(skeleton, values)

    def _skeleton(self, manifest, allow_pickle):
        shards = {s["rank"]: s for s in manifest["shards"]}
        shard = shards.get(self.rank, shards.get(0))
        meta = shard["metadata"] if shard else b""
        if not meta.startswith(_METADATA_MAGIC):
            raise _core.FailedPreconditionError(
                f"muster.load: step {manifest['step']} was not saved by muster.save (its "
                "manifest holds no Python state); read its tensors with muster.load_tensors")
        blob = meta[len(_METADATA_MAGIC):]
        try:
            return pickle.loads(blob) if allow_pickle else _state.restricted_loads(blob)
        except pickle.UnpicklingError as e:
            raise _core.FailedPreconditionError(f"muster.load: step {manifest['step']}: {e}") \
                from None

    def _request(self, step, leaf, entry, manifest, device):
        stored = list(entry["shape"])
        raw = _TORCH_DTYPES.get(leaf.dtype) is None if leaf.kind == "torch" else \
            _NUMPY_DTYPES.get(leaf.dtype) is None
        shape = stored[:-1] if raw else stored
        offsets, lengths = [], []
        if leaf.layout == "rows":
            total = shape[0]
            off, n = shard_rows(total, self.rank, self.world_size)
            if total < self.world_size:
                raise _core.InvalidArgumentError(
                    f"muster.load: tensor '{leaf.name}' has {total} rows: it cannot be sharded "
                    f"by rows over {self.world_size} ranks")
            out_shape = [n] + shape[1:]
            offsets = [off] + [0] * (len(shape) - 1)
            lengths = out_shape
        elif leaf.layout == "per_rank":
            if shape[0] != self.world_size:
                raise _core.InvalidArgumentError(
                    f"muster.load: per-rank tensor '{leaf.name}' was saved by {shape[0]} ranks "
                    f"and cannot be mapped onto {self.world_size}: load at world size "
                    f"{shape[0]}, or save it replicated or as a RowShard")
            out_shape = [1] + shape[1:]
            offsets = [self.rank] + [0] * (len(shape) - 1)
            lengths = out_shape
        else:
            out_shape = shape
        out = _empty(leaf, out_shape, device, f"muster.load: step {step}")
        dtype, obj, extra = _storage(leaf, out)
        if extra is not None and (offsets or lengths):
            offsets, lengths = offsets + [0], lengths + [extra]
        if entry["dtype"] != dtype:
            raise _core.DataLossError(
                f"muster.load: tensor '{leaf.name}' is stored as {entry['dtype']}, its state "
                f"says {leaf.dtype}")
        r = _core.Tensor()
        r.name, r.dtype = leaf.name, dtype
        r.offsets, r.lengths = offsets, lengths
        r.data, r.memory = _pointer(obj)
        return out, (r, obj)


def _empty(leaf, shape, device, what):
    """An empty torch tensor (on `device`, default the CPU) or numpy array of `shape` for a leaf
    of a loaded skeleton. The skeleton comes from stored bytes: a kind or dtype that no save
    writes (e.g. a numpy dtype of Python objects, whose raw bytes would be pointers) is
    DataLossError, never an array the restore writes into."""
    where = f"{what}: tensor '{leaf.name}'"
    if leaf.kind == "torch":
        torch = import_torch()
        if torch is None:
            raise _core.FailedPreconditionError(
                f"{where} was saved from torch, which this Python cannot import")
        dtype = getattr(torch, str(leaf.dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise _core.DataLossError(f"{where} has an unknown torch dtype {leaf.dtype!r}")
        return torch.empty(shape, dtype=dtype, device=device if device is not None else "cpu")
    if leaf.kind in ("numpy", "npscalar"):
        if np is None:
            raise _core.FailedPreconditionError(
                f"{where} was saved from numpy, which this Python cannot import")
        try:
            dtype = np.dtype(leaf.dtype)
        except (TypeError, ValueError):
            raise _core.DataLossError(f"{where} has an unknown numpy dtype {leaf.dtype!r}") \
                from None
        if dtype.hasobject:
            raise _core.DataLossError(f"{where} claims a numpy dtype of Python objects")
        return np.empty(shape, dtype=dtype)
    raise _core.DataLossError(f"{where} has an unknown kind {leaf.kind!r}")


def _collect_leaves(x, out):
    if isinstance(x, Leaf):
        out.append(x)
    elif isinstance(x, dict):
        for v in x.values():
            _collect_leaves(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _collect_leaves(v, out)


def load_tensors(step, dir=None):
    """Every tensor of a committed step (one saved by C++, adopted, or by muster.save) as whole
    numpy arrays by name; bf16 comes back as torch tensors when torch is there."""
    ck = Checkpointer(dir, 0, 1)
    manifest = ck._ck.read_manifest(step)
    out, requests = {}, []
    names = {"f32": "<f4", "f64": "<f8", "f16": "<f2", "i32": "<i4", "i64": "<i8",
             "u8": "|u1", "i8": "|i1", "bool": "|b1"}
    for t in manifest["tensors"]:
        if t["dtype"] == "bf16":
            torch = import_torch()
            if torch is None:
                a = np.empty(t["shape"], dtype="<u2")  # the raw bf16 bits
            else:
                a = torch.empty(t["shape"], dtype=torch.bfloat16)
        else:
            a = np.empty(t["shape"], dtype=names[t["dtype"]])
        r = _core.Tensor()
        r.name, r.dtype = t["name"], t["dtype"]
        r.data, r.memory = _pointer(a)
        out[t["name"]] = a
        requests.append(r)
    ck._ck.restore(step, requests)
    return out


__all__ = ["Checkpointer", "SaveHandle", "RowShard", "PerRank", "shard_rows", "load_tensors",
           "MAX_PICKLE_BYTES"]
