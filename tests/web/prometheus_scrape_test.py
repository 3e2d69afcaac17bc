#!/usr/bin/env python3
"""A real Prometheus (Debian's `prometheus`) scrapes a real coordinator's /metrics on loopback.

A coordinator with two agents (aws-1, gcp-1; one slot each) runs one job that reports progress
(step 7 of 100, loss 1.5) and keeps running, and holds a second job pending behind it. Then the
test asks Prometheus's own HTTP API (/api/v1/query) for the series and checks that their values
are the coordinator's state as its JSON API and `muster status` give it.

Usage (ctest does this): prometheus_scrape_test.py  with MUSTER_BIN and PROMETHEUS_BIN set.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import Proc, get_json, wait_until  # noqa: E402

MUSTER = os.environ.get("MUSTER_BIN", "muster")
PROMETHEUS = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")


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
        for name, provider in [("aws-1", "aws"), ("gcp-1", "gcp")]:
            self.start([MUSTER, "agent", "--insecure", "--coordinator", self.endpoint, "--name",
                        name, "--provider", provider, "--island", provider + "-a", "--slots",
                        "1", "--gpus", "0", "--address", "127.0.0.1", "--work-dir",
                        os.path.join(self.dir, name)], name)
        wait_until("two nodes up",
                   lambda: sum(n["state"] == "up"
                               for n in get_json(url + "api/nodes")["nodes"]) == 2, 30)
        spec = os.path.join(self.dir, "job.yaml")
        with open(spec, "w") as f:
            f.write('name: train\ncommand: ["sh", "-c", "echo MUSTER_PROGRESS step=7 total=100 '
                    'loss=1.5 tokens_per_s=320; exec sleep 300"]\nplacement:\n'
                    '  providers: [aws]\n')
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
                    f"    static_configs:\n      - targets: ['{host_port}']\n")
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
        series = len(query('{job="muster"}'))
        print(f"prometheus scraped {series} series; {int(passes)} scheduler passes")


if __name__ == "__main__":
    unittest.main(verbosity=2)
