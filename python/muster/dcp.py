"""torch.distributed.checkpoint (DCP) through muster: a StorageWriter and a StorageReader.

    import torch.distributed.checkpoint as dcp
    from muster.dcp import MusterStorageWriter, MusterStorageReader
    dcp.save(state_dict, storage_writer=MusterStorageWriter(step=100))
    dcp.load(state_dict, storage_reader=MusterStorageReader(step="latest"))

A DCP save is one muster step. Each chunk DCP gives a rank to write (a whole tensor, or a box of
a sharded one: ShardedTensor / DTensor) becomes that rank's box of the muster tensor
"dcp/<fqn>" (global shape and dtype as DCP describes them), so the C++ checkpointer stores it
with per-block checksums and a load reads any box of it — whatever sharding the loading job
has — touching only the overlapping byte ranges. Byte items (DCP's pickled non-tensor values)
become u8 tensors "dcp-bytes/<fqn>". Each rank's user metadata lists its items; the
coordinator's also carries DCP's own Metadata (pickled), which the reader hands back to DCP.

The core (DcpCore: items in, boxes out, no torch) is what CI tests with numpy buffers (torch
1.13's DCP does not import on Debian's Python 3.11). The torch classes below it need torch >= 2.2
and are exercised end to end only where such a torch exists (scripts/gpu-check.sh).
"""

import io
import pickle

from muster import _core
from muster._state import loaded_torch, np
from muster.checkpoint import Checkpointer, _pointer, _NUMPY_DTYPES

_DCP_MAGIC = b"muster-dcp/1\n"
_TORCH_TO_MUSTER = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
                    "int32": "i32", "int64": "i64", "uint8": "u8", "int8": "i8", "bool": "bool"}


def tensor_name(fqn):
    return f"dcp/{fqn}"


def bytes_name(fqn):
    return f"dcp-bytes/{fqn}"


class TensorItem:
    """One chunk a rank writes: the box [offsets, offsets + shape(data)) of the global tensor
    `fqn` of `global_shape`. `data` is a C-contiguous numpy array or torch tensor."""

    __slots__ = ("fqn", "offsets", "global_shape", "data")

    def __init__(self, fqn, offsets, global_shape, data):
        self.fqn, self.offsets, self.global_shape, self.data = (
            fqn, list(offsets), list(global_shape), data)


class BytesItem:
    __slots__ = ("fqn", "data")

    def __init__(self, fqn, data):
        self.fqn, self.data = fqn, bytes(data)


def _muster_dtype(data):
    torch = loaded_torch()
    if torch is not None and isinstance(data, torch.Tensor):
        d = _TORCH_TO_MUSTER.get(str(data.dtype).replace("torch.", ""))
    else:
        d = _NUMPY_DTYPES.get(np.dtype(data.dtype).str)
    if d is None:
        raise TypeError(f"muster.dcp: dtype {data.dtype} has no muster name")
    return d


class DcpCore:
    """The torch-free part: saves items as one muster step and reads boxes back."""

    def __init__(self, checkpointer=None):
        self.ck = checkpointer or Checkpointer()

    def save(self, step, items, extra=b""):
        """Starts saving `items` (this rank's) as `step`; `extra` rides in this rank's metadata.
        Returns the muster SaveHandle (the commit)."""
        refs, keep, index = [], [], []
        for it in items:
            r = _core.Tensor()
            if isinstance(it, BytesItem):
                buf = np.frombuffer(it.data, dtype=np.uint8) if it.data else np.zeros(0, np.uint8)
                r.name, r.dtype, r.shape, r.replicated = bytes_name(it.fqn), "u8", [len(it.data)], \
                    False
                r.offsets, r.lengths = [0], [len(it.data)]
                obj = buf
                index.append(("bytes", it.fqn, r.name, [len(it.data)], "u8"))
            elif isinstance(it, TensorItem):
                obj = it.data
                if not (obj.is_contiguous() if hasattr(obj, "is_contiguous")
                        else obj.flags.c_contiguous):
                    raise _core.InvalidArgumentError(
                        f"muster.dcp: chunk of '{it.fqn}' is not contiguous")
                shape = list(obj.shape)
                if len(shape) != len(it.global_shape) or len(it.offsets) != len(shape):
                    raise _core.InvalidArgumentError(
                        f"muster.dcp: chunk of '{it.fqn}' has {len(shape)} dims, its tensor "
                        f"{len(it.global_shape)}")
                r.name, r.dtype = tensor_name(it.fqn), _muster_dtype(obj)
                r.shape, r.offsets, r.lengths = it.global_shape, it.offsets, shape
                index.append(("tensor", it.fqn, r.name, it.global_shape, r.dtype))
            else:
                raise TypeError(f"muster.dcp: {type(it).__name__} is not a TensorItem or BytesItem")
            r.data, r.memory = _pointer(obj)
            keep.append(obj)
            refs.append(r)
        meta = _DCP_MAGIC + pickle.dumps({"items": index, "extra": extra}, protocol=4)
        return self.ck._submit(step, refs, meta, keep)

    def index(self, step):
        """(items, extras): every item of `step` by fqn as (kind, name, global shape, dtype),
        and each rank's `extra` by rank."""
        manifest = self.ck._ck.read_manifest(step)
        items, extras = {}, {}
        for shard in manifest["shards"]:
            meta = shard["metadata"]
            if not meta.startswith(_DCP_MAGIC):
                raise _core.FailedPreconditionError(
                    f"muster.dcp: step {step} was not written by the DCP storage writer")
            d = pickle.loads(meta[len(_DCP_MAGIC):])  # our own plain tuples and bytes
            for kind, fqn, name, shape, dtype in d["items"]:
                items[fqn] = (kind, name, list(shape), dtype)
            extras[shard["rank"]] = d["extra"]
        return items, extras

    def read_box(self, step, fqn, offsets, out):
        """Reads the box [offsets, offsets + out.shape) of tensor `fqn` into `out` (a
        C-contiguous numpy array or torch tensor of the stored dtype)."""
        self.read_boxes(step, [(fqn, offsets, out)])

    def read_boxes(self, step, boxes):
        reqs, keep = [], []
        for fqn, offsets, out in boxes:
            r = _core.Tensor()
            r.name, r.dtype = tensor_name(fqn), _muster_dtype(out)
            r.offsets, r.lengths = list(offsets), list(out.shape)
            r.data, r.memory = _pointer(out)
            reqs.append(r)
            keep.append(out)
        self.ck._ck.restore(step, reqs)

    def read_bytes(self, step, fqn, size):
        out = np.empty(size, dtype=np.uint8)
        r = _core.Tensor()
        r.name, r.dtype, r.data, r.memory = bytes_name(fqn), "u8", _pointer(out)[0], "host"
        self.ck._ck.restore(step, [r])
        return out.tobytes()


# -- torch.distributed.checkpoint adapters (torch >= 2.2) ----------------------------------------

def _dcp():
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.storage import StorageReader, StorageWriter
        return dcp, StorageReader, StorageWriter
    except Exception as e:  # torch 1.13's DCP fails to import on Python 3.11
        raise _core.FailedPreconditionError(
            f"muster.dcp: torch.distributed.checkpoint is not usable here ({e}); it needs "
            "torch >= 2.2") from None


def _make_classes():
    dcp, StorageReader, StorageWriter = _dcp()
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future
    torch = loaded_torch()

    class MusterStorageWriter(StorageWriter):
        """Writes a DCP save as muster step `step` (asynchronous: write_data returns once this
        rank's chunks are snapshotted; finish waits for the commit)."""

        def __init__(self, step=None, dir=None):
            super().__init__()
            self.step = step
            self.core = DcpCore(Checkpointer(dir) if dir else None)
            self.handle = None

        def reset(self, checkpoint_id=None):
            if checkpoint_id is not None:
                self.step = int(checkpoint_id)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id):
            return isinstance(checkpoint_id, int) or str(checkpoint_id).isdigit()

        def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
            self.is_coordinator = is_coordinator

        def prepare_local_plan(self, plan):
            return plan

        def prepare_global_plan(self, plans):
            return plans

        def write_data(self, plan, planner):
            if self.step is None:
                raise _core.InvalidArgumentError("MusterStorageWriter: no step (pass step= or "
                                                 "checkpoint_id=)")
            items, results = [], []
            for wi in plan.items:
                data = planner.resolve_data(wi)
                if wi.type == WriteItemType.BYTE_IO:
                    b = data.getvalue() if hasattr(data, "getvalue") else bytes(data)
                    items.append(BytesItem(wi.index.fqn, b))
                    results.append(WriteResult(index=wi.index, size_in_bytes=len(b),
                                               storage_data=bytes_name(wi.index.fqn)))
                else:
                    t = data.detach().contiguous()
                    chunk = wi.tensor_data.chunk
                    items.append(TensorItem(wi.index.fqn, list(chunk.offsets),
                                            list(wi.tensor_data.size), t))
                    results.append(WriteResult(index=wi.index,
                                               size_in_bytes=t.numel() * t.element_size(),
                                               storage_data=tensor_name(wi.index.fqn)))
            extra = b""
            md = getattr(planner, "metadata", None)
            if self.is_coordinator and md is not None:
                extra = pickle.dumps(md)
            if any(getattr(i.data, "is_cuda", False) for i in items if isinstance(i, TensorItem)):
                torch.cuda.synchronize()
            self.handle = self.core.save(self.step, items, extra)
            fut = Future()
            fut.set_result(results)
            return fut

        def finish(self, metadata, results):
            self.handle.wait()

        @property
        def checkpoint_id(self):
            return self.step

    class MusterStorageReader(StorageReader):
        """Reads muster step `step` ("latest": the resume step) for dcp.load."""

        def __init__(self, step="latest", dir=None):
            super().__init__()
            self.core = DcpCore(Checkpointer(dir) if dir else None)
            self.step = step

        def _resolved(self):
            if self.step == "latest":
                s = self.core.ck.resume_step()
                if s is None:
                    raise _core.NotFoundError("MusterStorageReader: no committed step")
                self.step = s
            return self.step

        def reset(self, checkpoint_id=None):
            if checkpoint_id is not None:
                self.step = checkpoint_id

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id):
            return checkpoint_id == "latest" or str(checkpoint_id).isdigit()

        def read_metadata(self):
            items, extras = self.core.index(self._resolved())
            self.items = items
            blob = extras.get(0) or next((e for e in extras.values() if e), b"")
            if not blob:
                raise _core.FailedPreconditionError(
                    f"MusterStorageReader: step {self.step} holds no DCP metadata")
            md = pickle.loads(blob)  # written by our writer on the coordinator
            if not isinstance(md, Metadata):
                raise _core.DataLossError("MusterStorageReader: bad DCP metadata")
            return md

        def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
            self.metadata = metadata

        def prepare_local_plan(self, plan):
            return plan

        def prepare_global_plan(self, plans):
            return plans

        def read_data(self, plan, planner):
            step = self._resolved()
            for ri in plan.items:
                fqn = ri.storage_index.fqn
                if ri.type == LoadItemType.BYTE_IO:
                    kind, name, shape, dtype = self.items[fqn]
                    planner.load_bytes(ri, io.BytesIO(self.core.read_bytes(step, fqn, shape[0])))
                    continue
                base = list(ri.storage_index.offset or [0] * len(ri.lengths))
                offsets = [b + o for b, o in zip(base, ri.storage_offsets)]
                target = planner.resolve_tensor(ri).detach()
                for d, (o, n) in enumerate(zip(ri.dest_offsets, ri.lengths)):
                    target = target.narrow(d, o, n)
                tmp = torch.empty(list(ri.lengths), dtype=target.dtype)
                self.core.read_box(step, fqn, offsets, tmp)
                target.copy_(tmp)
                planner.commit_tensor(ri, target)
            fut = Future()
            fut.set_result(None)
            return fut

        @property
        def checkpoint_id(self):
            return self.step

    return MusterStorageWriter, MusterStorageReader


def __getattr__(name):
    # The torch classes are made on first use, so importing muster.dcp never imports torch.
    if name in ("MusterStorageWriter", "MusterStorageReader"):
        w, r = _make_classes()
        globals().update(MusterStorageWriter=w, MusterStorageReader=r)
        return globals()[name]
    raise AttributeError(name)
