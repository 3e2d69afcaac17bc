#!/usr/bin/env python3
"""A coordinator killed with SIGKILL and started again on its data dir serves its checkpoint
counters (muster_checkpoint_bytes_total, muster_checkpoint_reports_total, the
muster_checkpoint_commit_seconds histogram) from where they were, not from zero, while the job
keeps running through the restart; a commit after the restart adds to them.

Real processes: `muster coordinator` (on a fixed port, so the agent finds it again), one
`muster agent`, and a shell-script rank that commits real checkpoint steps with the
checkpointer (muster-test-write-step): step 5 before the kill, step 10 after the restart (when
the test creates a file the rank waits for).

Usage (ctest does this): metrics_restart_test.py with MUSTER_BIN and WRITE_STEP_BIN set.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import Proc, get_json, wait_until  # noqa: E402

MUSTER = os.environ.get("MUSTER_BIN", "muster")
WRITE_STEP = os.environ.get("WRITE_STEP_BIN", "muster-test-write-step")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url):
    """The /metrics samples as {'name{labels}': value}."""
    with urllib.request.urlopen(url + "metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def step_bytes(vol, job, step):
    d = os.path.join(vol, job, f"step-{step:09d}")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f != "MANIFEST")


class MetricsRestartTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="durable2-metrics-restart-")
        self.procs = []

    def tearDown(self):
        for p in reversed(self.procs):
            p.stop()
        if os.environ.get("KEEP_TMP") is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, argv, name):
        p = Proc(argv, log_path=os.path.join(self.dir, name + ".log"))
        self.procs.append(p)
        return p

    def coordinator(self, name):
        coord = self.start([MUSTER, "coordinator", "--insecure", "--data-dir",
                            os.path.join(self.dir, "coord"), "--listen", self.endpoint,
                            "--http", "127.0.0.1:0", "--heartbeat-interval-ms", "200"], name)
        coord.wait_for(r"coordinator listening on (\S+)", 20)
        return coord, coord.wait_for(r"dashboard on (http://\S+)", 20).group(1)

    def test_checkpoint_counters_survive_a_coordinator_kill(self):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        coord, url = self.coordinator("coord")
        vol = os.path.join(self.dir, "vol")
        os.makedirs(vol)
        self.start([MUSTER, "agent", "--insecure", "--coordinator", self.endpoint, "--name",
                    "aws-1", "--provider", "aws", "--island", "aws-a", "--slots", "1", "--gpus",
                    "0", "--address", "127.0.0.1", "--volume", "ckpt=" + vol, "--work-dir",
                    os.path.join(self.dir, "aws-1")], "agent")
        wait_until("the node up", lambda: any(
            n["state"] == "up" for n in get_json(url + "api/nodes")["nodes"]), 30)
        go = os.path.join(self.dir, "go")
        spec = os.path.join(self.dir, "job.yaml")
        with open(spec, "w") as f:
            f.write('name: train\ncommand: ["sh", "-c", "'
                    + WRITE_STEP + ' \\"$MUSTER_CHECKPOINT_DIR\\" 5 65536 announce || exit 9; '
                    'while [ ! -e ' + go + ' ]; do sleep 0.1; done; '
                    + WRITE_STEP + ' \\"$MUSTER_CHECKPOINT_DIR\\" 10 131072 announce || exit 9; '
                    'exec sleep 300"]\nplacement:\n  providers: [aws]\n'
                    'checkpoint:\n  volume: ckpt\n')
        r = subprocess.run([MUSTER, "submit", spec, "--insecure", "--coordinator",
                            self.endpoint], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        job = r.stdout.strip()
        lbl = f'job_id="{job}",provider="aws"'
        reports = f'muster_checkpoint_reports_total{{{lbl},kind="commit"}}'
        wait_until("step 5 counted", lambda: metrics(url).get(reports) == 1, 30)
        before = {k: v for k, v in metrics(url).items() if k.startswith("muster_checkpoint_")
                  and job in k}
        size5 = step_bytes(vol, job, 5)
        self.assertEqual(before[f'muster_checkpoint_bytes_total{{{lbl},kind="commit"}}'], size5)
        self.assertEqual(before[f"muster_checkpoint_commit_seconds_count{{{lbl}}}"], 1)
        attempt = get_json(url + f"api/jobs/{job}")["attempt"]

        # SIGKILL: nothing is flushed at exit.
        os.killpg(coord.proc.pid, signal.SIGKILL)
        coord.proc.wait(10)
        coord, url = self.coordinator("coord2")
        wait_until("the job running again on the restarted coordinator", lambda: (
            lambda j: j["state"] == "running")(get_json(url + f"api/jobs/{job}")), 30)
        after = {k: v for k, v in metrics(url).items() if k.startswith("muster_checkpoint_")
                 and job in k}
        for key, value in before.items():
            if key.startswith("muster_checkpoint_newest_step") or "commits_total" in key:
                continue  # from the catalog, not counters; checked as present below
            self.assertEqual(after.get(key), value, f"{key} after the restart")

        open(go, "w").close()
        wait_until("step 10 counted on top", lambda: metrics(url).get(reports) == 2, 30)
        m = metrics(url)
        self.assertEqual(m[f'muster_checkpoint_bytes_total{{{lbl},kind="commit"}}'],
                         size5 + step_bytes(vol, job, 10))
        self.assertEqual(m[f"muster_checkpoint_commit_seconds_count{{{lbl}}}"], 2)
        self.assertGreater(m[f"muster_checkpoint_commit_seconds_sum{{{lbl}}}"],
                           before[f"muster_checkpoint_commit_seconds_sum{{{lbl}}}"])
        self.assertEqual(m[f"muster_checkpoint_commits_total{{{lbl}}}"], 2)
        self.assertEqual(get_json(url + f"api/jobs/{job}")["attempt"], attempt,
                         "the job kept running through the restart")


if __name__ == "__main__":
    unittest.main(verbosity=2)
