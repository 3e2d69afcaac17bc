#!/usr/bin/env python3
"""The dashboard in a real browser (Debian's headless chromium, driven over the DevTools pipe).

`muster demo` starts a coordinator with its dashboard and four agents on two simulated providers,
submits the C++ fine-tune, gives one of its nodes a preemption notice midway, and the job resumes
on the other provider. While that runs, and after, the test looks at the page as a person would:

  - the jobs table shows the job running, live (its step moves on while the page is open);
  - the job page draws both attempts, one line each, on two different providers;
  - the preemption mark sits at the step checkpointed on the notice (where the demo says it
    checkpointed, and where the second attempt resumed), on the step axis where that step is;
  - the resume mark names the other provider;
  - the checkpoint taken on the notice is listed under both providers (the replica);
  - the events timeline and a rank's log tail are there; the nodes view holds both providers.

Screenshots go to the build directory (SCREENSHOT_DIR). Usage (ctest does this):
dashboard_web_test.py with MUSTER_BIN, CHROMIUM_BIN and SCREENSHOT_DIR set.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cdp import Browser  # noqa: E402
from procs import Proc, get_json, wait_until  # noqa: E402

MUSTER = os.environ.get("MUSTER_BIN", "muster")
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
SHOTS = os.environ.get("SCREENSHOT_DIR", os.getcwd())


class DashboardWebTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="dashboard-web-")
        os.makedirs(SHOTS, exist_ok=True)
        self.demo = None
        self.browser = None

    def tearDown(self):
        if self.browser:
            self.browser.close()
        if self.demo:
            self.demo.stop()
        if os.environ.get("KEEP_TMP") is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def page(self, expr):
        return self.browser.eval(expr)

    def wait_page(self, what, expr, timeout):
        return wait_until(what, lambda: self.page(expr), timeout, interval=0.25)

    def test_a_person_sees_the_preemption_and_the_resume(self):
        self.demo = Proc([MUSTER, "demo", "--work-dir", os.path.join(self.dir, "demo"),
                          "--steps", "60", "--ckpt-every", "20", "--preempt-at", "25",
                          "--notice", "15", "--timeout", "150", "--http", "127.0.0.1:0"],
                         stdin=subprocess.PIPE, log_path=os.path.join(SHOTS, "demo-output.txt"))
        url = self.demo.wait_for(r"dashboard\s+(?:\x1b\[1m)?(http://[0-9.:]+/)", 30).group(1)
        job = self.demo.wait_for(r"job (?:\x1b\[1m)?(finetune-\d+)", 60).group(1)

        self.browser = Browser(CHROMIUM, os.path.join(self.dir, "chromium"))
        self.browser.open(url)
        # Live: the jobs table shows the job running and its step moving while the page is open.
        row = f'document.querySelector(\'tr.job-row[data-job="{job}"]\')'
        first = self.wait_page("the job running in the jobs table",
                               f'(() => {{ const r = {row}; return r && r.dataset.state === "running" '
                               f'&& Number(r.querySelector(".step").textContent.split("/")[0]'
                               f'.replace(/,/g, "")) > 0 && r.querySelector(".step").textContent; }})()',
                               90)
        self.wait_page("the step to move on the open page",
                       f'{row} && {row}.querySelector(".step").textContent !== {first!r}', 60)
        self.browser.screenshot(os.path.join(SHOTS, "dashboard-jobs-live.png"))

        self.browser.navigate(url + "#/job/" + job)
        # The first attempt that ran: usually 1, but a start that finds its rendezvous port taken
        # (another job on this host) is retried on other ports as the next attempt, never drawn.
        first_attempt = self.wait_page(
            "the first attempt drawn live",
            '(() => { const l = document.querySelector("path.attempt-line"); '
            'return l && l.dataset.attempt; })()', 60)
        # A rank's log tail, read from its node while the node is up: the demo's nodes come from
        # on-demand providers and are released (with their logs) once idle after the job.
        self.wait_page("rank 0's log tail",
                       'document.getElementById("log").textContent.includes("MUSTER_PROGRESS")', 20)
        self.browser.screenshot(os.path.join(SHOTS, "dashboard-job-attempt1.png"))

        # The nodes view while attempt 1 runs: the job's two aws nodes, and gcp's node that the
        # demo's eval job holds.
        self.browser.navigate(url)
        nodes = self.wait_page(
            "the nodes view",
            '(() => { const p = [...document.querySelectorAll("#nodes .provider")]; '
            'const n = p.map(e => [e.dataset.provider, e.querySelectorAll(".node").length]); '
            'return n.length === 2 && n; })()', 20)
        counts = dict(map(tuple, nodes))
        self.assertEqual(counts.get("aws"), 2, nodes)
        self.assertGreaterEqual(counts.get("gcp", 0), 1, nodes)
        self.browser.screenshot(os.path.join(SHOTS, "dashboard-home.png"))
        self.browser.navigate(url + "#/job/" + job)

        m = self.demo.wait_for(r"checkpointed step (\d+) on the notice, resumed from step (\d+) "
                               r"on (\w+)", 150)
        notice_step, resume_step, resumed_on = int(m.group(1)), int(m.group(2)), m.group(3)
        self.demo.wait_for(r"press Enter to stop", 30)
        api = get_json(url + "api/jobs/" + job)
        self.assertEqual(api["state"], "succeeded")
        # The attempts that ran: the first one drawn and every one after it, but a start retried
        # on other ports (its port was taken on this shared host), which ran no program and is
        # never drawn, before the first one or after the notice.
        ran = [a for a in api["attempts"]
               if a["attempt"] >= int(first_attempt) and a["outcome"] != "start_retry"]
        self.assertEqual(len(ran), 2, api["attempts"])
        first_provider = ran[0]["provider"]
        self.assertNotEqual(first_provider, resumed_on)

        # Both attempts drawn, one line each, on two providers.
        lines = self.wait_page(
            "both attempts drawn",
            '(() => { const l = [...document.querySelectorAll("path.attempt-line")]; '
            'return l.length === 2 && l.map(p => ({attempt: p.dataset.attempt, '
            'provider: p.dataset.provider, points: Number(p.dataset.points), '
            'first: Number(p.dataset.firstStep), last: Number(p.dataset.lastStep), '
            'width: p.getBoundingClientRect().width})); })()', 30)
        self.assertEqual([l["attempt"] for l in lines], [str(a["attempt"]) for a in ran])
        self.assertEqual(lines[0]["provider"], first_provider)
        self.assertEqual(lines[1]["provider"], resumed_on)
        for l in lines:
            self.assertGreater(l["points"], 1, l)
            self.assertGreater(l["width"], 10, l)
        # Progress reaches the coordinator with heartbeats (sampled), so the first point is the
        # first sample: before the notice, not necessarily step 1.
        self.assertLess(lines[0]["first"], notice_step)
        self.assertGreaterEqual(lines[1]["first"], resume_step)
        self.assertEqual(lines[1]["last"], 60)

        # The preemption mark at the step checkpointed on the notice, where that step is on
        # the axis; the resume mark on the other provider.
        mark = self.page(
            '(() => { const c = document.getElementById("loss-chart"); '
            'const m = c.querySelector("g.mark.preempt"); const r = c.querySelector("g.mark.resume"); '
            'const line = m && m.querySelector("line"); '
            'return m && r && {step: Number(m.dataset.step), attempt: m.dataset.attempt, '
            'x: Number(line.getAttribute("x1")), x0: Number(c.dataset.x0), '
            'x1: Number(c.dataset.x1), max: Number(c.dataset.maxStep), text: m.textContent, '
            'rstep: Number(r.dataset.step), rprovider: r.dataset.provider, rtext: r.textContent, '
            'visible: line.getBoundingClientRect().height > 50}; })()')
        self.assertIsNotNone(mark, "no preemption or resume mark on the chart")
        self.assertEqual(mark["attempt"], first_attempt)
        self.assertEqual(mark["step"], notice_step)
        self.assertEqual(notice_step, resume_step, "the demo lost steps")
        expected_x = mark["x0"] + notice_step / mark["max"] * (mark["x1"] - mark["x0"])
        self.assertAlmostEqual(mark["x"], expected_x, delta=0.5)
        self.assertTrue(mark["visible"])
        self.assertIn(f"step {notice_step}", mark["text"])
        self.assertEqual(mark["rstep"], resume_step)
        self.assertEqual(mark["rprovider"], resumed_on)
        self.assertIn(f"resumed from step {resume_step} on {resumed_on}", mark["rtext"])

        # The notice's checkpoint under both providers.
        for provider in (first_provider, resumed_on):
            listed = self.page(
                f'document.querySelector(\'.provider-ckpts[data-provider="{provider}"] '
                f'.ckpt-step[data-step="{notice_step}"]\') !== null')
            self.assertTrue(listed, f"step {notice_step} not listed under {provider}")

        # The timeline and a rank's log.
        want = ["scheduled", "notice", "requeued", "resumed", "checkpoint_committed", "succeeded"]
        self.wait_page(f"the events timeline to show {want}",
                       f'(() => {{ const k = [...document.querySelectorAll("#events tr.event")]'
                       f'.map(r => r.dataset.kind); return {want!r}.every(w => k.includes(w)); }})()',
                       20)
        self.browser.screenshot(os.path.join(SHOTS, "dashboard-job.png"))

        # Enter ends the demo.
        self.demo.proc.stdin.write(b"\n")
        self.demo.proc.stdin.flush()
        self.assertEqual(self.demo.proc.wait(30), 0, self.demo.out[-3000:])
        print("screenshots in", SHOTS)


if __name__ == "__main__":
    unittest.main(verbosity=2)
