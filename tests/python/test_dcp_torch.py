#!/usr/bin/env python3
"""torch.distributed.checkpoint end to end through muster (dcp.save, dcp.async_save, dcp.load
with MusterStorageWriter/Reader) at two ranks under `muster run -np 2`, then `muster ckpt
verify`. Needs torch >= 2.2 (skips where DCP does not import: torch 1.13 on Python 3.11, CI);
run on the GPU machine's torch 2.x by scripts/gpu-check.sh."""

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
MUSTER_BIN = os.environ["MUSTER_BIN"]


def dcp_usable():
    try:
        importlib.import_module("torch.distributed.checkpoint")
        from torch.distributed.checkpoint.storage import StorageWriter  # noqa: F401
        return True
    except Exception:
        return False


# scripts/gpu-check.sh sets MUSTER_REQUIRE_DCP=1: there a skip would hide a missing DCP.
@unittest.skipUnless(dcp_usable() or os.environ.get("MUSTER_REQUIRE_DCP") == "1",
                     "torch.distributed.checkpoint is not usable (torch >= 2.2)")
class DcpTorchTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="muster-dcp-torch-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_save_async_save_and_load_through_muster(self):
        out = subprocess.run([MUSTER_BIN, "run", "-np", "2", "--timeout", "240",
                              "--checkpoint-dir", self.dir, "--", sys.executable,
                              os.path.join(HERE, "dcp_torch_rank.py")], capture_output=True,
                             text=True, timeout=300)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        for r in (0, 1):
            self.assertIn(f"rank {r}: dcp ok", out.stdout + out.stderr)
        for step in (5, 6):
            self.assertEqual(out.stdout.count(f"MUSTER_CHECKPOINT step={step}"), 1, out.stdout)
        v = subprocess.run([MUSTER_BIN, "ckpt", "verify", self.dir], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual(v.returncode, 0, v.stdout + v.stderr)


if __name__ == "__main__":
    unittest.main()
