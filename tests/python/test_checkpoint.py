#!/usr/bin/env python3
"""muster.save / muster.load in one process (world size 1): nested state of torch tensors,
numpy arrays and picklable objects comes back bit-exact; the saved step is the snapshot taken
when save returned; `muster ckpt verify` accepts the step; bad input raises a clear exception.
Run by ctest (label unit) with Debian's python3 and PYTHONPATH=<build>/python.
"""

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

import muster

try:
    import torch
except ImportError:
    torch = None

MUSTER_BIN = os.environ.get("MUSTER_BIN", "")


class Custom:
    def __init__(self, v):
        self.v = v

    def __eq__(self, other):
        return isinstance(other, Custom) and other.v == self.v


def assert_same(test, a, b, path="state"):
    """Bit-exact equality, types included."""
    test.assertIs(type(a), type(b), path)
    if torch is not None and isinstance(a, torch.Tensor):
        test.assertEqual(a.dtype, b.dtype, path)
        test.assertEqual(tuple(a.shape), tuple(b.shape), path)
        test.assertEqual(a.contiguous().view(-1).view(torch.uint8).tolist()
                         if a.numel() else [], b.contiguous().view(-1).view(torch.uint8).tolist()
                         if b.numel() else [], path)
    elif isinstance(a, np.ndarray):
        test.assertEqual(a.dtype, b.dtype, path)
        test.assertEqual(a.shape, b.shape, path)
        test.assertEqual(np.ascontiguousarray(a).tobytes(), np.ascontiguousarray(b).tobytes(),
                         path)
    elif isinstance(a, np.generic):
        test.assertEqual(a.dtype, b.dtype, path)
        test.assertEqual(a.tobytes(), b.tobytes(), path)
    elif isinstance(a, dict):
        test.assertEqual(list(a.keys()), list(b.keys()), path)
        for k in a:
            assert_same(test, a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        test.assertEqual(len(a), len(b), path)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(test, x, y, f"{path}[{i}]")
    else:
        test.assertEqual(a, b, path)


class CheckpointTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="muster-py-")
        self.ck = muster.Checkpointer(self.dir, 0, 1)

    def tearDown(self):
        self.ck.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def state(self):
        rng = np.random.default_rng(7)
        s = {
            "f32": rng.standard_normal((33, 17)).astype(np.float32),
            "f64": rng.standard_normal(5),
            "i16": np.arange(-7, 7, dtype=np.int16),          # stored raw (u8)
            "c64": (rng.standard_normal(4) + 1j).astype(np.complex64),
            "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
            "bool": np.array([True, False, True]),
            "empty": np.zeros((0, 4), dtype=np.float32),
            "zero_d": np.array(3.25, dtype=np.float16),
            "strided": rng.standard_normal((8, 6)).astype(np.float32)[::2, 1::2],
            "np_scalar": np.int64(-12),
            "objects": [1, "two", (3.0, None), {"k": b"bytes"}, {1, 2}, 2**70],
            "ordered": collections.OrderedDict([("b", 1), ("a", np.arange(3))]),
        }
        if torch is not None:
            g = torch.Generator().manual_seed(3)
            lin = torch.nn.Linear(4, 3)
            opt = torch.optim.AdamW(lin.parameters())
            lin(torch.randn(2, 4, generator=g)).sum().backward()
            opt.step()
            s["torch"] = {
                "model": lin.state_dict(),
                "optim": opt.state_dict(),
                "bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
                "i16": torch.arange(10, dtype=torch.int16),
                "rng": torch.get_rng_state(),
                "scalar": torch.tensor(2.5),
                "transposed": torch.randn(4, 6, generator=g).t(),
            }
        return s

    def test_round_trip_is_bit_exact(self):
        s = self.state()
        self.ck.save(10, s).wait()
        assert_same(self, self.ck.load(10), s)
        assert_same(self, self.ck.load("latest"), s)

    def test_save_is_a_snapshot(self):
        a = np.arange(1 << 16, dtype=np.float32)
        before = a.copy()
        tensors = {"a": a}
        if torch is not None:
            t = torch.arange(1000, dtype=torch.float64)
            tensors["t"] = t
            t_before = t.clone()
        h = self.ck.save(1, tensors)
        a += 1  # after save returned: must not reach the saved step
        if torch is not None:
            t.mul_(-1)
        h.wait()
        got = self.ck.load(1)
        self.assertEqual(got["a"].tobytes(), before.tobytes())
        if torch is not None:
            self.assertTrue(torch.equal(got["t"], t_before))

    def test_commits_in_order_and_latest(self):
        h1 = self.ck.save(1, {"x": np.array([1])})
        h2 = self.ck.save(2, {"x": np.array([2])})  # waits for step 1's commit
        self.assertTrue(h1.done())
        h2.wait()
        self.assertEqual(self.ck.latest_step(), 2)
        self.assertEqual(self.ck.load()["x"].tolist(), [2])
        self.assertEqual(self.ck.load(1)["x"].tolist(), [1])

    def test_ckpt_verify_accepts_python_steps(self):
        if not MUSTER_BIN:
            self.skipTest("MUSTER_BIN not set")
        self.ck.save(4, self.state()).wait()
        out = subprocess.run([MUSTER_BIN, "ckpt", "verify", self.dir], capture_output=True,
                             text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("step 4: ok", out.stdout + out.stderr)

    def test_load_tensors_reads_by_name(self):
        s = {"layer": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}}
        self.ck.save(3, s).wait()
        got = muster.load_tensors(3, dir=self.dir)
        self.assertEqual(got["layer/w"].tobytes(), s["layer"]["w"].tobytes())

    # -- bad input ------------------------------------------------------------------------------

    def test_unsupported_object_names_its_path(self):
        with self.assertRaises(TypeError) as e:
            self.ck.save(1, {"model": {"fn": lambda x: x}})
        self.assertIn("['model']['fn']", str(e.exception))
        with self.assertRaises(TypeError) as e:
            self.ck.save(1, {"a": np.array([object()], dtype=object)})
        self.assertIn("objects", str(e.exception))

    def test_missing_step(self):
        self.ck.save(5, {"x": np.zeros(2)}).wait()
        with self.assertRaises(muster.NotFoundError) as e:
            self.ck.load(6)
        self.assertIsInstance(e.exception, LookupError)
        self.assertIn("6", str(e.exception))
        empty = muster.Checkpointer(os.path.join(self.dir, "none"), 0, 1)
        with self.assertRaises(muster.NotFoundError):
            empty.load("latest")

    def test_bad_steps(self):
        for step in (-1, 1.5, "7", True):
            with self.assertRaises(ValueError):
                self.ck.save(step, {"x": np.zeros(1)})
        with self.assertRaises(ValueError):
            self.ck.load("newest")

    def test_per_rank_refuses_another_world_size(self):
        self.ck.save(1, {"rng": muster.PerRank(np.arange(4, dtype=np.uint8))}).wait()
        self.assertEqual(self.ck.load(1)["rng"].tolist(), [0, 1, 2, 3])
        other = muster.Checkpointer(self.dir, 1, 2)  # loads need no store
        with self.assertRaises(muster.InvalidArgumentError) as e:
            other.load(1)
        self.assertIn("saved by 1 ranks", str(e.exception))

    def test_rows_cannot_map_to_more_ranks_than_rows(self):
        self.ck.save(1, {"w": muster.RowShard(np.ones((2, 3)))}).wait()
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.Checkpointer(self.dir, 0, 3).load(1)
        self.assertIn("2 rows", str(e.exception))
        # Two ranks is fine: one row each.
        self.assertEqual(muster.Checkpointer(self.dir, 1, 2).load(1)["w"].shape, (1, 3))

    def test_row_shard_must_match_its_declared_split(self):
        with self.assertRaises(ValueError):
            self.ck.save(1, {"w": muster.RowShard(np.ones((2, 3)), total_rows=5)})
        with self.assertRaises(ValueError):
            self.ck.save(1, {"w": muster.RowShard(np.ones((2, 3)), offset=4, total_rows=5)})
        with self.assertRaises(ValueError):
            self.ck.save(1, {"w": muster.RowShard(np.array(1.0, dtype=np.float32))})
        with self.assertRaises(TypeError):
            self.ck.save(1, {"w": muster.RowShard([1, 2])})

    def test_pickled_classes_need_allow_pickle(self):
        self.ck.save(1, {"obj": Custom(3)}).wait()
        with self.assertRaises(muster.FailedPreconditionError) as e:
            self.ck.load(1)
        self.assertIn("Custom", str(e.exception))
        self.assertIn("allow_pickle", str(e.exception))
        self.assertEqual(self.ck.load(1, allow_pickle=True)["obj"], Custom(3))

    def test_too_big_objects_are_refused(self):
        with self.assertRaises(muster.InvalidArgumentError):
            self.ck.save(1, {"blob": b"x" * (muster.MAX_PICKLE_BYTES + 1)})

    def test_damaged_shard_is_data_loss(self):
        self.ck.save(2, {"w": np.arange(4096, dtype=np.float32)}).wait()
        shard = os.path.join(self.dir, "step-000000002", "shard-00000.bin")
        with open(shard, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
        with self.assertRaises(muster.DataLossError):
            self.ck.load(2)

    def test_step_without_python_state(self):
        # A step whose manifest holds no Python state, as C++ programs and `ckpt adopt` write it.
        a = np.arange(8, dtype=np.int32)
        r = muster._core.Tensor()
        r.name, r.dtype, r.shape, r.replicated = "x", "i32", [8], True
        r.data = a.__array_interface__["data"][0]
        self.ck._ck.save(1, [r], b"")
        self.ck._ck.wait()
        with self.assertRaises(muster.FailedPreconditionError) as e:
            self.ck.load(1)
        self.assertIn("load_tensors", str(e.exception))
        self.assertEqual(muster.load_tensors(1, dir=self.dir)["x"].tolist(), a.tolist())

    def test_a_skeleton_naming_object_arrays_is_data_loss_not_a_crash(self):
        # A manifest whose Python state claims a numpy array of objects over raw bytes: loading
        # it must not make an object array out of those bytes (a segfault on first use).
        import pickle
        from muster._state import Leaf
        from muster.checkpoint import _METADATA_MAGIC
        a = np.full(16, 0x41, dtype=np.uint8)
        r = muster._core.Tensor()
        r.name, r.dtype, r.shape, r.replicated = "x", "u8", [2, 8], True
        r.data = a.__array_interface__["data"][0]
        cases = [(1, Leaf("x", "numpy", "|O", (2,), "replicated")),
                 (3, Leaf("x", "pickle", "|u1", (2,), "replicated"))]
        if torch is not None:
            cases.append((2, Leaf("x", "torch", "save", (2,), "replicated")))
        for step, leaf in cases:
            self.ck._ck.save(step, [r], _METADATA_MAGIC + pickle.dumps({"x": leaf}))
            self.ck._ck.wait()
            with self.assertRaises(muster.DataLossError) as e:
                self.ck.load(step)
            self.assertIn("tensor 'x'", str(e.exception))

    def test_no_checkpoint_dir(self):
        old = os.environ.pop("MUSTER_CHECKPOINT_DIR", None)
        try:
            with self.assertRaises(muster.FailedPreconditionError) as e:
                muster.Checkpointer()
            self.assertIn("MUSTER_CHECKPOINT_DIR", str(e.exception))
        finally:
            if old is not None:
                os.environ["MUSTER_CHECKPOINT_DIR"] = old

    def test_world_size_without_store(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_RDZV")}
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            ck = muster.Checkpointer(self.dir, 0, 2)  # loading needs no store; saving does
            with self.assertRaises(muster.FailedPreconditionError) as e:
                ck.save(1, {"x": np.zeros(1)})
            self.assertIn("MUSTER_RDZV_ENDPOINT", str(e.exception))
        finally:
            os.environ.clear()
            os.environ.update(saved)


class RankEnvTest(unittest.TestCase):
    def env_of(self, **env):
        code = ("import muster; e = muster.env(); print(e.rank, e.world_size, e.local_rank, "
                "e.job_id, e.attempt, e.checkpoint_dir, e.resume_step)")
        base = {k: v for k, v in os.environ.items()
                if k == "PYTHONPATH" or not (k.startswith("MUSTER_") or k in (
                    "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK"))}
        return subprocess.run([sys.executable, "-c", code], env=dict(base, **env),
                              capture_output=True, text=True, timeout=60)

    def test_env_contract_as_one_object(self):
        out = self.env_of(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                          MUSTER_JOB_ID="ft-2", MUSTER_ATTEMPT="2",
                          MUSTER_CHECKPOINT_DIR="/ck/ft-2", MUSTER_RESUME_STEP="120")
        self.assertEqual(out.stdout.split(), ["3", "4", "1", "ft-2", "2", "/ck/ft-2", "120"],
                         out.stderr)
        fresh = self.env_of(MUSTER_RESUME_STEP="")
        self.assertEqual(fresh.stdout.split(), ["0", "1", "0", "0", "None"], fresh.stderr)

    def test_malformed_env_is_a_clear_error(self):
        out = self.env_of(RANK="4", WORLD_SIZE="4")
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("muster.InvalidArgumentError", out.stderr)
        self.assertIn("RANK", out.stderr)


if __name__ == "__main__":
    unittest.main()
