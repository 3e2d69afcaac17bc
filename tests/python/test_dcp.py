#!/usr/bin/env python3
"""The DCP storage core with numpy buffers: two real ranks (`muster run -np 2`) write column
boxes of one tensor, a tensor of one rank and byte items as one muster step; a reader at another
world size reads any box (straddling the ranks' chunks), the byte items and the coordinator's
metadata back bit-exact; `muster ckpt verify` accepts the step. Run by ctest (integration).
torch's DCP itself does not import on Python 3.11 + torch 1.13: the adapter classes are checked
end to end only on a torch >= 2.2 machine."""

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

import muster
from muster.dcp import DcpCore

HERE = os.path.dirname(os.path.abspath(__file__))
MUSTER_BIN = os.environ["MUSTER_BIN"]


class DcpCoreTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="muster-dcp-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_boxes_written_by_two_ranks_read_back_at_one(self):
        out = subprocess.run([MUSTER_BIN, "run", "-np", "2", "--timeout", "60",
                              "--checkpoint-dir", self.dir, "--", sys.executable,
                              os.path.join(HERE, "dcp_rank.py")], capture_output=True, text=True,
                             timeout=90)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertEqual(out.stdout.count("MUSTER_CHECKPOINT step=12"), 1, out.stdout)

        core = DcpCore(muster.Checkpointer(self.dir, 0, 1))
        items, extras = core.index(12)
        self.assertEqual(items["layer.weight"], ("tensor", "dcp/layer.weight", [6, 8], "f32"))
        self.assertEqual(items["only0"][2:], ([5], "i64"))
        self.assertEqual(extras, {0: b"coordinator-metadata", 1: b""})
        g = np.arange(6 * 8, dtype=np.float32).reshape(6, 8) / 7
        whole = np.empty((6, 8), np.float32)
        core.read_box(12, "layer.weight", [0, 0], whole)
        self.assertEqual(whole.tobytes(), g.tobytes())
        box = np.empty((3, 3), np.float32)  # rows 2-4, cols 3-5: both ranks' chunks
        core.read_box(12, "layer.weight", [2, 3], box)
        self.assertEqual(box.tobytes(), np.ascontiguousarray(g[2:5, 3:6]).tobytes())
        only = np.empty(5, np.int64)
        core.read_box(12, "only0", [0], only)
        self.assertEqual(only.tolist(), list(range(5)))
        for r in range(2):
            b = f"pickled-{r}".encode() * 3
            self.assertEqual(core.read_bytes(12, f"extra{r}", len(b)), b)
        with self.assertRaises(muster.InvalidArgumentError):  # outside the tensor
            core.read_box(12, "layer.weight", [4, 0], np.empty((3, 8), np.float32))
        with self.assertRaises(muster.NotFoundError):
            core.read_box(12, "missing", [0], np.empty(1, np.float32))
        v = subprocess.run([MUSTER_BIN, "ckpt", "verify", self.dir], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(v.returncode, 0, v.stdout + v.stderr)

    def test_a_plain_step_is_not_a_dcp_step(self):
        ck = muster.Checkpointer(self.dir, 0, 1)
        ck.save(1, {"x": np.zeros(3)}).wait()
        with self.assertRaises(muster.FailedPreconditionError):
            DcpCore(ck).index(1)

    def test_torch_adapter_says_what_it_needs(self):
        import muster.dcp as mdcp
        try:
            importlib.import_module("torch.distributed.checkpoint")
            self.skipTest("this torch has a usable DCP")
        except Exception:
            pass
        with self.assertRaises(muster.FailedPreconditionError) as e:
            mdcp.MusterStorageWriter
        self.assertIn("torch >= 2.2", str(e.exception))


if __name__ == "__main__":
    unittest.main()
