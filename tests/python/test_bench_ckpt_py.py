#!/usr/bin/env python3
"""`muster-bench ckpt-py --json` prints one JSON object with the fields docs/benchmarks.md and
the GPU check read, even though the checkpointer announces each commit on stdout when it runs
outside a job (a small state: this checks the plumbing, not the speed)."""

import json
import os
import shutil
import subprocess
import tempfile
import unittest

BENCH = os.environ["MUSTER_BENCH"]


class BenchCkptPyTest(unittest.TestCase):
    def test_json_is_one_clean_object(self):
        d = tempfile.mkdtemp(prefix="muster-bench-ckpt-py-")
        try:
            r = subprocess.run([BENCH, "ckpt-py", "--dir", d, "--size-mb", "8", "--tensors", "2",
                                "--repeat", "1", "--json"], capture_output=True, text=True,
                               timeout=120)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        j = json.loads(r.stdout)
        self.assertEqual(j["bytes"], 8 << 20)
        for k in ("save_gbps", "stall_s", "memcpy_s", "disk_write_gbps", "save_s",
                  "snapshot_stall_s", "snapshot_held_s"):
            self.assertGreater(j[k], 0, k)


if __name__ == "__main__":
    unittest.main()
