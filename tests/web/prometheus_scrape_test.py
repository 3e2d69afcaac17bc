#!/usr/bin/env python3
"""A real Prometheus (Debian's `prometheus`) scrapes a real coordinator's /metrics on loopback,
and the /metrics of one of its agents (`muster agent --http`).

A coordinator with two agents (aws-1, gcp-1; one slot each) runs one job that commits a real
checkpoint (the checkpointer announces it with its commit latency), reports progress (step 7 of
100, loss 1.5) and keeps running, and holds a second job pending behind it. Then the test asks
Prometheus's own HTTP API (/api/v1/query) for the series and checks that their values are the
coordinator's state as its JSON API and `muster status` give it, that the checkpoint's bytes and
latency are what the rank committed and printed, and that the agent's series name the rank it
runs (its pid, as the rank printed it).

Usage (ctest does this): prometheus_scrape_test.py  with MUSTER_BIN, PROMETHEUS_BIN and
WRITE_STEP_BIN set.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import Proc, get_json, wait_until  # noqa: E402

MUSTER = os.environ.get("MUSTER_BIN", "muster")
PROMETHEUS = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")
WRITE_STEP = os.environ.get("WRITE_STEP_BIN", "muster-test-write-step")


def get_text(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusScrapeTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="dashboard-prom-")
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

    def muster(self, *args):
        r = subprocess.run([MUSTER, *args, "--insecure", "--coordinator", self.endpoint],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def test_prometheus_scrapes_the_coordinators_state(self):
        coord = self.start([MUSTER, "coordinator", "--insecure", "--data-dir",
                            os.path.join(self.dir, "coord"), "--listen", "tcp://127.0.0.1:*",
                            "--http", "127.0.0.1:0", "--heartbeat-interval-ms", "200"], "coord")
        self.endpoint = coord.wait_for(r"coordinator listening on (\S+)", 20).group(1)
        url = coord.wait_for(r"dashboard on (http://\S+)", 20).group(1)
        host_port = urllib.parse.urlparse(url).netloc
        agents = {}
        for name, provider in [("aws-1", "aws"), ("gcp-1", "gcp")]:
            vol = os.path.join(self.dir, "vol-" + name)
            os.makedirs(vol)
            extra = ["--http", "127.0.0.1:0"] if name == "aws-1" else []
            agents[name] = self.start(
                [MUSTER, "agent", "--insecure", "--coordinator", self.endpoint, "--name",
                 name, "--provider", provider, "--island", provider + "-a", "--slots", "1",
                 "--gpus", "0", "--address", "127.0.0.1", "--volume", "ckpt=" + vol,
                 "--work-dir", os.path.join(self.dir, name), *extra], name)
        agent_url = agents["aws-1"].wait_for(r"agent metrics on (http://\S+)", 20).group(1)
        agent_host_port = urllib.parse.urlparse(agent_url).netloc
        wait_until("two nodes up",
                   lambda: sum(n["state"] == "up"
                               for n in get_json(url + "api/nodes")["nodes"]) == 2, 30)
        spec = os.path.join(self.dir, "job.yaml")
        with open(spec, "w") as f:
            f.write('name: train\ncommand: ["sh", "-c", "echo pid=$$; '
                    + WRITE_STEP + ' \\"$MUSTER_CHECKPOINT_DIR\\" 5 65536 announce || exit 9; '
                    'echo MUSTER_PROGRESS step=7 total=100 loss=1.5 tokens_per_s=320; '
                    'exec sleep 300"]\nplacement:\n  providers: [aws]\n'
                    'checkpoint:\n  volume: ckpt\n')
        running = self.muster("submit", spec).strip()
        wait_until("the first job running at step 7", lambda: (
            lambda j: j["state"] == "running" and j["progress"] and j["progress"]["step"] == 7)(
                get_json(url + "api/jobs/" + running)), 30)
        waiting = self.muster("submit", spec).strip()
        wait_until("the second job pending", lambda: get_json(
            url + "api/jobs/" + waiting)["state"] == "pending", 30)

        prom_port = free_port()
        cfg = os.path.join(self.dir, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "scrape_configs:\n  - job_name: muster\n"
                    f"    static_configs:\n      - targets: ['{host_port}']\n"
                    "  - job_name: agent\n"
                    f"    static_configs:\n      - targets: ['{agent_host_port}']\n")
        self.start([PROMETHEUS, "--config.file", cfg, "--storage.tsdb.path",
                    os.path.join(self.dir, "tsdb"), "--web.listen-address",
                    f"127.0.0.1:{prom_port}"], "prometheus")
        api = f"http://127.0.0.1:{prom_port}/api/v1/query?query="

        def query(expr):
            r = get_json(api + urllib.parse.quote(expr))
            self.assertEqual(r["status"], "success", r)
            return {json.dumps(s["metric"], sort_keys=True): float(s["value"][1])
                    for s in r["data"]["result"]}

        def one(expr):
            v = query(expr)
            return list(v.values())[0] if len(v) == 1 else None

        wait_until("Prometheus to scrape the coordinator (up == 1)",
                   lambda: one('up{job="muster"}') == 1, 60)
        wait_until("a scrape holding the second job",
                   lambda: one("muster_queue_depth") == 1, 30)

        # The coordinator's state, as its JSON API and the CLI give it.
        jobs = get_json(url + "api/jobs")["jobs"]
        nodes = get_json(url + "api/nodes")["nodes"]
        status = self.muster("status")
        self.assertIn(running, status)
        self.assertIn(waiting, status)
        states = {}
        for j in jobs:
            states[j["state"]] = states.get(j["state"], 0) + 1
        self.assertEqual(states, {"running": 1, "pending": 1})
        for state in ["running", "pending", "succeeded", "failed"]:
            self.assertEqual(one(f'muster_jobs{{state="{state}"}}'), states.get(state, 0), state)
        self.assertEqual(one("muster_queue_depth"),
                         sum(j["state"] in ("pending", "requeued") for j in jobs))
        run = next(j for j in jobs if j["id"] == running)
        self.assertEqual(one(f'muster_job_step{{job_id="{running}"}}'), run["progress"]["step"])
        self.assertEqual(one(f'muster_job_step{{job_id="{running}"}}'), 7)
        self.assertEqual(one(f'muster_job_total_steps{{job_id="{running}"}}'), 100)
        self.assertEqual(one(f'muster_job_loss{{job_id="{running}"}}'), 1.5)
        self.assertEqual(one(f'muster_job_last_progress_timestamp_seconds{{job_id="{running}"}}'),
                         run["progress"]["time_ms"] / 1000.0)
        self.assertEqual(one(f'muster_job_attempts{{job_id="{running}"}}'), run["attempt"])
        self.assertIsNone(one(f'muster_job_step{{job_id="{waiting}"}}'), "only running jobs")
        pending = query("muster_jobs_pending")
        self.assertEqual(sum(pending.values()), 1, pending)
        for n in nodes:
            self.assertEqual(one(f'muster_nodes{{provider="{n["provider"]}",'
                                 f'island="{n["island"]}",state="{n["state"]}"}}'), 1, n)
            age = one(f'muster_node_heartbeat_age_seconds{{node="{n["name"]}"}}')
            self.assertIsNotNone(age)
            self.assertLess(age, 5, "heartbeats every 200 ms")
        passes = one("muster_scheduler_pass_seconds_count")
        self.assertGreater(passes, 0)
        self.assertEqual(one('muster_scheduler_pass_seconds_bucket{le="+Inf"}'), passes)
        self.assertEqual(one('muster_restarts_total{cause="preemption"}'), 0)

        # The checkpoint the rank committed: its size on the volume, and the latency the
        # checkpointer measured and printed (`MUSTER_CHECKPOINT step=5 seconds=S`).
        step_dir = os.path.join(self.dir, "vol-aws-1", running, "step-000000005")
        size = sum(os.path.getsize(os.path.join(step_dir, f))
                   for f in os.listdir(step_dir) if f != "MANIFEST")
        self.assertGreaterEqual(size, 65536)
        log = self.muster("logs", running, "--rank", "0")
        printed = re.search(r"MUSTER_CHECKPOINT step=5 seconds=([0-9.]+)", log)
        self.assertIsNotNone(printed, log)
        lbl = f'job_id="{running}",provider="aws"'
        self.assertEqual(one(f'muster_checkpoint_bytes_total{{{lbl},kind="commit"}}'), size)
        self.assertEqual(one(f'muster_checkpoint_reports_total{{{lbl},kind="commit"}}'), 1)
        self.assertEqual(one(f'muster_checkpoint_commit_seconds_count{{{lbl}}}'), 1)
        self.assertAlmostEqual(one(f'muster_checkpoint_commit_seconds_sum{{{lbl}}}'),
                               float(printed.group(1)), places=6)
        self.assertEqual(one(f'muster_checkpoint_commits_total{{{lbl}}}'), 1)

        # The agent's own /metrics: the rank it runs, with the pid the rank printed.
        pid = re.search(r"pid=(\d+)", log).group(1)
        wait_until("Prometheus to scrape the agent (up == 1)",
                   lambda: one('up{job="agent"}') == 1, 60)
        # The attempt the JSON API gives (a start retried on other ports is a new attempt).
        rank = (f'muster_agent_rank_info{{node="aws-1",job_id="{running}",'
                f'attempt="{run["attempt"]}",rank="0",pid="{pid}",state="running"}}')
        try:
            wait_until("the agent's rank series", lambda: one(rank) == 1, 30)
        except AssertionError as e:
            raise AssertionError(f"{e}: want {rank}; Prometheus has "
                                 f"{query('muster_agent_rank_info')}; the agent serves "
                                 f"{get_text(agent_url)}") from None
        self.assertEqual(one('muster_agent_ranks{node="aws-1",state="running"}'), 1)
        age = one(f'muster_agent_rank_last_output_age_seconds{{job_id="{running}",rank="0"}}')
        self.assertIsNotNone(age)
        self.assertGreaterEqual(age, 0)
        self.assertEqual(one('muster_agent_replication_copies_in_flight{node="aws-1"}'), 0)
        series = len(query('{job="muster"}'))
        print(f"prometheus scraped {series} series; {int(passes)} scheduler passes")


if __name__ == "__main__":
    unittest.main(verbosity=2)
