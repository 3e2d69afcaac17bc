#!/usr/bin/env python3
"""The rank's side through the muster package under `muster run -np 2`: muster.progress reaches
muster as one MUSTER_PROGRESS line from rank 0; a notice seen by rank 1 alone (SIGTERM after
install_sigterm_handler) makes agree_to_stop() true on both ranks at the same call. Run by ctest
(label integration)."""

import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
MUSTER_BIN = os.environ["MUSTER_BIN"]


class RuntimeTest(unittest.TestCase):
    def test_progress_notice_and_agreed_stop(self):
        out = subprocess.run([MUSTER_BIN, "run", "-np", "2", "--timeout", "60", "--",
                              sys.executable, os.path.join(HERE, "runtime_rank.py")],
                             capture_output=True, text=True, timeout=90)
        text = out.stdout + out.stderr
        self.assertEqual(out.returncode, 0, text)
        self.assertEqual(text.count("MUSTER_PROGRESS step=3 total=10 loss=1.5"), 1, text)
        self.assertIn("tokens_per_s=100", text)
        self.assertIn("rank 0: first=False seen=False agreed=True", text)
        self.assertIn("rank 1: first=False seen=True agreed=True reason='SIGTERM'", text)


if __name__ == "__main__":
    unittest.main()
