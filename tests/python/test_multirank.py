#!/usr/bin/env python3
"""muster.save from real ranks under `muster run -np 2` (the launcher puts the package on the
ranks' PYTHONPATH; the ranks commit through the job's store), then muster.load of the same step
at world sizes 1, 2 and 3: the row-sharded tensors reassemble bit-exact; rank 0 alone announces
the commit; `muster ckpt verify` accepts the step. Run by ctest (label integration).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

import muster

HERE = os.path.dirname(os.path.abspath(__file__))
MUSTER_BIN = os.environ["MUSTER_BIN"]


class MultiRankTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="muster-py-mr-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_save_at_two_ranks_load_at_one_two_three(self):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([MUSTER_BIN, "run", "-np", "2", "--timeout", "60",
                              "--checkpoint-dir", self.dir, "--", sys.executable,
                              os.path.join(HERE, "multirank_rank.py")],
                             env=env, capture_output=True, text=True, timeout=90)
        text = out.stdout + out.stderr
        self.assertEqual(out.returncode, 0, text)
        self.assertIn("rank 0/2 ok", text)
        self.assertIn("rank 1/2 ok", text)
        self.assertEqual(out.stdout.count("MUSTER_CHECKPOINT step=7"), 1, text)
        self.assertEqual(out.stdout.count("MUSTER_CHECKPOINT step=8"), 1, text)

        expect = np.arange(7 * 5, dtype=np.float32).reshape(7, 5) * 1.5
        for world in (1, 2, 3):
            parts, evens = [], []
            for rank in range(world):
                got = muster.Checkpointer(self.dir, rank, world).load(7)
                parts.append(got["emb"])
                evens.append(got["even"])
                self.assertEqual(got["bias"].tobytes(), np.linspace(0, 1, 11).tobytes())
                self.assertEqual(got["emb"].shape[0], muster.shard_rows(7, rank, world)[1])
            self.assertEqual(np.concatenate(parts).tobytes(), expect.tobytes(), world)
            self.assertEqual(np.concatenate(evens).tolist(),
                             [[0] * 3, [0] * 3, [1] * 3, [1] * 3], world)
        # Per-rank state maps only onto the world size that saved it.
        for world in (1, 3):
            with self.assertRaises(muster.InvalidArgumentError) as e:
                muster.Checkpointer(self.dir, 0, world).load(8)
            self.assertIn("saved by 2 ranks", str(e.exception))
        self.assertEqual(muster.Checkpointer(self.dir, 1, 2).load(8)["rank_rng"].tolist(), [10])

        v = subprocess.run([MUSTER_BIN, "ckpt", "verify", self.dir], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(v.returncode, 0, v.stdout + v.stderr)


if __name__ == "__main__":
    unittest.main()
