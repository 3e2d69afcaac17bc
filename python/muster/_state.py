"""Walking a nested training state: tensors and arrays out, a picklable skeleton left.

A state is any nesting of dicts (OrderedDict, defaultdict), lists and tuples whose leaves are
torch tensors, numpy arrays, numpy scalars, and small picklable objects (ints, floats, strings,
None, ...). `flatten` replaces every tensor-like leaf by a `Leaf` placeholder named after its
path ("model/fc.weight", "optimizer/state/0/exp_avg") and returns the skeleton; `unflatten`
puts loaded tensors back. The skeleton is what goes into the manifest's per-rank user metadata
(pickled); the tensors go into the shard files through the C++ checkpointer.

Loading never runs arbitrary pickled code unless asked: `restricted_loads` refuses every global
but plain containers, `Leaf`, and torch/numpy dtypes, naming the refused class.
"""

import io
import pickle

try:
    import numpy as np
except ImportError:  # numpy is optional: torch-only states still work
    np = None

import sys


def loaded_torch():
    """torch if this process has imported it, else None: `import muster` never pays for importing
    torch (seconds), and a state can only hold torch tensors once torch is imported."""
    return sys.modules.get("torch")


def import_torch():
    """torch, imported on demand (to load a state saved from torch), or None."""
    try:
        import torch
        return torch
    except ImportError:
        return None


class RowShard:
    """Marks a tensor as this rank's rows [offset, offset + rows) of a tensor of `total_rows`
    rows (dimension 0), so a load at another world size gets the rows it asks for.

    RowShard(t): every rank holds the same number of rows, in rank order (offset = rank * rows).
    RowShard(t, total_rows=N): the rows are split as numpy.array_split does (the first N % world
    ranks hold one row more); muster.shard_rows(N) gives this rank's range.
    RowShard(t, offset=o, total_rows=N): any split, given explicitly.
    """

    __slots__ = ("tensor", "offset", "total_rows")

    def __init__(self, tensor, offset=None, total_rows=None):
        self.tensor = tensor
        self.offset = offset
        self.total_rows = total_rows


class PerRank:
    """Marks a tensor that differs on every rank (e.g. torch.get_rng_state()): each rank's copy
    is stored and each rank loads its own; loading at another world size is refused."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


def shard_rows(total_rows, rank, world_size):
    """(offset, rows) of `rank` when `total_rows` rows are split over `world_size` ranks the way
    numpy.array_split splits them."""
    base, extra = divmod(total_rows, world_size)
    offset = rank * base + min(rank, extra)
    return offset, base + (1 if rank < extra else 0)


class Leaf:
    """A tensor-like leaf of a saved state, as the skeleton records it."""

    __slots__ = ("name", "kind", "dtype", "shape", "layout", "device")

    # kind: "torch", "numpy", "npscalar"; dtype: torch's or numpy's name of the element type;
    # shape: the global shape as the user sees it; layout: "replicated", "rows", "per_rank";
    # device: "cpu" or "cuda" (where a torch tensor lived when saved).
    def __init__(self, name, kind, dtype, shape, layout, device="cpu"):
        self.name = name
        self.kind = kind
        self.dtype = dtype
        self.shape = tuple(shape)
        self.layout = layout
        self.device = device

    def __reduce__(self):
        return (Leaf, (self.name, self.kind, self.dtype, self.shape, self.layout, self.device))

    def __repr__(self):
        return f"Leaf({self.name!r}, {self.kind}, {self.dtype}, {self.shape}, {self.layout})"


def is_tensor(x):
    torch = loaded_torch()
    return torch is not None and isinstance(x, torch.Tensor)


def is_array(x):
    return np is not None and isinstance(x, np.ndarray)


def is_np_scalar(x):
    return np is not None and isinstance(x, np.generic)


def _is_namedtuple(x):
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _describe(path):
    return "state" + "".join(f"[{k!r}]" for k in path)


def flatten(state, what="muster.save"):
    """Returns (skeleton, leaves): leaves is a list of (Leaf, value, wrapper) in walk order,
    where value is the tensor/array and wrapper the RowShard/PerRank that marked it (or None).
    `what` starts the errors' messages (the caller's name)."""
    leaves = []
    names = set()

    def name_of(path):
        base = "/".join(str(k) for k in path) or "_"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}#{n}"
        names.add(name)
        return name

    def walk(x, path):
        wrapper = None
        if isinstance(x, (RowShard, PerRank)):
            wrapper, x = x, x.tensor
            if not (is_tensor(x) or is_array(x)):
                raise TypeError(f"{what}: {_describe(path)} is a {type(wrapper).__name__} "
                                f"of a {type(x).__name__}: only tensors and numpy arrays can "
                                "be sharded")
        if is_tensor(x) or is_array(x) or is_np_scalar(x):
            if is_tensor(x):
                kind, dtype = "torch", str(x.dtype).replace("torch.", "")
                device = x.device.type
                if device not in ("cpu", "cuda"):
                    raise TypeError(f"{what}: {_describe(path)} is on device '{x.device}': "
                                    "only CPU and CUDA tensors can be saved")
                if x.layout != loaded_torch().strided:
                    raise TypeError(f"{what}: {_describe(path)} is a {x.layout} tensor: "
                                    "only dense (strided) tensors can be saved")
            else:
                kind = "numpy" if is_array(x) else "npscalar"
                dtype, device = np.dtype(x.dtype).str, "cpu"
                if np.dtype(x.dtype).hasobject:
                    raise TypeError(f"{what}: {_describe(path)} is a numpy array of "
                                    "Python objects: only fixed-size element types can be saved")
            shape = tuple(x.shape)
            layout = "replicated"
            if isinstance(wrapper, RowShard):
                layout = "rows"
                if len(shape) == 0:
                    raise ValueError(f"{what}: {_describe(path)} is 0-dimensional: "
                                     "it has no rows to shard")
            elif isinstance(wrapper, PerRank):
                layout = "per_rank"
            leaf = Leaf(name_of(path), kind, dtype, shape, layout, device)
            leaves.append((leaf, x, wrapper))
            return leaf
        if isinstance(x, dict):
            out = x.copy()
            for k, v in x.items():
                out[k] = walk(v, path + [k])
            return out
        if isinstance(x, list) and type(x) is list:
            return [walk(v, path + [i]) for i, v in enumerate(x)]
        if isinstance(x, tuple):
            items = [walk(v, path + [i]) for i, v in enumerate(x)]
            return type(x)(*items) if _is_namedtuple(x) else tuple(items)
        return x

    skeleton = walk(state, [])
    return skeleton, leaves


def unflatten(skeleton, values):
    """Replaces each Leaf of `skeleton` by values[leaf.name]."""

    def walk(x):
        if isinstance(x, Leaf):
            return values[x.name]
        if isinstance(x, dict):
            out = x.copy()
            for k, v in x.items():
                out[k] = walk(v)
            return out
        if type(x) is list:
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            items = [walk(v) for v in x]
            return type(x)(*items) if _is_namedtuple(x) else tuple(items)
        return x

    return walk(skeleton)


def find_unpicklable(state):
    """The path and error of the first leaf of `state` that does not pickle, or None."""

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                r = walk(v, path + [k])
                if r:
                    return r
            return None
        if isinstance(x, (list, tuple)) and (type(x) in (list, tuple) or _is_namedtuple(x)):
            for i, v in enumerate(x):
                r = walk(v, path + [i])
                if r:
                    return r
            return None
        try:
            pickle.dumps(x, protocol=4)
        except Exception as e:  # pickle raises many types
            return _describe(path), type(x).__name__, e
        return None

    return walk(state, [])


_SAFE_BUILTINS = {"set", "frozenset", "complex", "slice", "range", "bytearray", "list", "dict",
                  "tuple", "int", "float", "str", "bytes", "bool"}
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("collections", "defaultdict"),
                 ("collections", "deque"), ("numpy", "dtype"), ("torch", "Size")}


class RefusedGlobal(pickle.UnpicklingError):
    """restricted_loads met a class it does not unpickle by default (the message names it)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module in ("muster._state",) and name == "Leaf":
            return Leaf
        torch = import_torch() if module == "torch" else None
        if torch is not None and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise RefusedGlobal(
            f"the checkpoint's state holds a {module}.{name} object, which muster does not "
            "unpickle by default (it could run code); pass allow_pickle=True to muster.load if "
            "you trust the checkpoint")


def restricted_loads(data):
    return _RestrictedUnpickler(io.BytesIO(data)).load()

