#!/usr/bin/env python3
"""examples/pytorch_ddp/train.py under two real ranks (gloo): forked here with the torchrun env
contract only (its torch.save path), under `muster run -np 2` and as a job of real agents (its
muster-package path: async muster.save, muster.load). Killed with SIGKILL and resumed from its
latest checkpoint, or stopped by a SIGTERM notice and resumed, it ends with the same parameters
as an uninterrupted run. Run by ctest (label `examples`) with Debian's python3-torch.
"""

import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples",
                     "pytorch_ddp", "train.py")
STEPS = 20
ARGS = ["--steps", str(STEPS), "--ckpt-every", "4", "--log-every", "1", "--batch", "8"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rank:
    """One rank process whose combined output is collected by a thread."""

    def __init__(self, rank, world, port, ckpt_dir, extra_env):
        env = dict(os.environ, PYTHONFAULTHANDLER="1", RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), MUSTER_CHECKPOINT_DIR=ckpt_dir, **extra_env)
        self.proc = subprocess.Popen([sys.executable, TRAIN] + ARGS, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = ""
        self.cv = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            with self.cv:
                self.out += line.decode(errors="replace")
                self.cv.notify_all()

    def wait_output(self, needle, timeout):
        with self.cv:
            return self.cv.wait_for(lambda: needle in self.out, timeout)

    def wait(self, timeout):
        code = self.proc.wait(timeout)
        self.reader.join(timeout)
        self.proc.stdout.close()
        return code


def launch(ckpt_dir, extra_env=None):
    port = free_port()
    return [Rank(r, 2, port, ckpt_dir, extra_env or {}) for r in range(2)]


def run_to_end(ckpt_dir, extra_env=None, timeout=120):
    """Launches both ranks and waits for both. The port free_port() found may be taken by
    another test before rank 0 binds it (ctest runs tests in parallel): then rank 0 fails with
    "Address already in use" and rank 1 may wait on whatever took the port. That launch is
    retried on a new port, up to 3 times. A rank still running at `timeout` is aborted (its
    Python traceback, by faulthandler, lands in its output) or else killed, and the failure shows
    both ranks' output."""
    for _ in range(3):
        ranks = launch(ckpt_dir, extra_env)
        deadline = time.monotonic() + timeout
        codes = []
        for r in ranks:
            try:
                codes.append(r.wait(max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
            if codes[0] != 0 and "Address already in use" in ranks[0].out:
                break  # rank 1 waits on a port nobody of ours listens on
        taken = "Address already in use" in ranks[0].out
        for r, c in zip(ranks, codes + [None] * (len(ranks) - len(codes))):
            if c is None:  # SIGABRT first: faulthandler prints where it hung
                r.proc.send_signal(signal.SIGABRT)
                try:
                    r.proc.wait(10)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait()
                r.reader.join(5)
        codes += [None] * (len(ranks) - len(codes))
        if not taken:
            break
        print("rendezvous port taken by another process: launching again", flush=True)
    out = "".join(f"--- rank {i} (exit {c}) ---\n{r.out}" for i, (r, c) in enumerate(zip(ranks, codes)))
    return codes, ranks, out


def launch_and_reach(ckpt_dir, step, timeout=90):
    """Launches both ranks and waits until rank 0 prints progress at `step`. As in run_to_end, a
    launch whose rank 0 could not bind the port free_port() found (another test took it first)
    is stopped and retried on a new port, up to 3 times. Returns the ranks and whether `step`
    was reached."""
    for _ in range(3):
        ranks = launch(ckpt_dir)
        needle = f"MUSTER_PROGRESS step={step} "
        with ranks[0].cv:
            ranks[0].cv.wait_for(lambda: needle in ranks[0].out or
                                 "Address already in use" in ranks[0].out or
                                 ranks[0].proc.poll() is not None, timeout)
            reached = needle in ranks[0].out
            taken = "Address already in use" in ranks[0].out
        if reached or not taken:
            return ranks, reached
        for r in ranks:
            r.proc.kill()
            r.wait(30)
        print("rendezvous port taken by another process: launching again", flush=True)
    return ranks, False


def field(out, prefix, key):
    found = None
    for line in out.splitlines():
        if line.startswith(prefix):
            m = re.search(r"\b%s=(\S+)" % key, line)
            if m:
                found = m.group(1)
    return found


class PytorchDdpTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="muster-ddp-test-")
        codes, ranks, out = run_to_end(os.path.join(cls.root, "ref"))
        assert codes == [0, 0], out
        cls.want = field(ranks[0].out, "MUSTER_DONE", "param_digest")
        assert cls.want and len(cls.want) == 16, ranks[0].out
        assert "checkpoints: torch.save in" in ranks[0].out, ranks[0].out

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def interrupt_and_resume(self, name, sig, expected_code):
        ckpt = os.path.join(self.root, name)
        at = random.randint(6, STEPS - 3)
        print(f"{name}: signal {sig} at step {at}", flush=True)
        ranks, reached = launch_and_reach(ckpt, at)
        self.assertTrue(reached, ranks[0].out)
        for r in ranks:
            r.proc.send_signal(sig)
        codes = [r.wait(60) for r in ranks]
        self.assertEqual(codes, [expected_code] * 2, ranks[0].out + ranks[1].out)
        with open(os.path.join(ckpt, "LATEST")) as f:
            latest = int(f.read())
        self.assertGreaterEqual(latest, 4)
        codes, ranks, out = run_to_end(ckpt, {"MUSTER_RESUME_STEP": str(latest)})
        self.assertEqual(codes, [0, 0], out)
        self.assertIn(f"resumed from step {latest}", ranks[0].out)
        self.assertEqual(field(ranks[0].out, "MUSTER_DONE", "param_digest"), self.want,
                         ranks[0].out)
        return latest

    def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(self):
        self.interrupt_and_resume("kill", signal.SIGKILL, -signal.SIGKILL)

    def test_sigterm_notice_checkpoints_the_agreed_step_then_resume_matches(self):
        latest = self.interrupt_and_resume("term", signal.SIGTERM, 3)
        self.assertGreater(latest, 6)  # the notice's own checkpoint, past the kill step's grid

    def test_checkpoints_are_committed_atomically(self):
        names = sorted(os.listdir(os.path.join(self.root, "ref")))
        self.assertEqual(names, ["LATEST"] + [f"step-{s:09d}.pt" for s in range(4, STEPS + 1, 4)])


MUSTER = os.environ.get("MUSTER_BIN", "")


class MusterRun:
    """`muster run -np 2 train.py` (the muster path: the package on PYTHONPATH from the
    launcher, async muster.save, muster.load on resume), its output collected by a thread."""

    def __init__(self, ckpt_dir):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [MUSTER, "run", "-np", "2", "--grace", "30", "--checkpoint-dir", ckpt_dir, "--",
             sys.executable, TRAIN] + ARGS, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        self.out = ""
        self.cv = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    _read = Rank._read
    wait_output = Rank.wait_output
    wait = Rank.wait


@unittest.skipUnless(MUSTER, "MUSTER_BIN is not set (ctest sets it)")
class PytorchDdpUnderMusterRunTest(unittest.TestCase):
    """train.py under `muster run -np 2` checkpoints through the muster package: killed with
    SIGKILL after a commit, or stopped by SIGTERM (a notice), it resumes from the newest muster
    step and ends with the parameters of an uninterrupted run; the steps pass `ckpt verify`."""

    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="muster-ddp-run-")
        ref = MusterRun(os.path.join(cls.root, "ref"))
        assert ref.wait(120) == 0, ref.out
        cls.want = field(ref.out, "MUSTER_DONE", "param_digest")
        assert cls.want, ref.out
        assert "checkpoints: muster in" in ref.out, ref.out
        cls.ref_out = ref.out

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def test_uninterrupted_run_matches_the_torchrun_path_and_verifies(self):
        if getattr(PytorchDdpTest, "want", None):
            self.assertEqual(self.want, PytorchDdpTest.want)
        ckpt = os.path.join(self.root, "ref")
        steps = sorted(n for n in os.listdir(ckpt) if n.startswith("step-"))
        self.assertEqual(steps, [f"step-{s:09d}" for s in range(4, STEPS + 1, 4)])
        for s in range(4, STEPS + 1, 4):  # announced by the library, once, by rank 0
            commits = re.findall(rf"^MUSTER_CHECKPOINT step={s}( seconds=\S+)?$", self.ref_out,
                                 re.M)
            self.assertEqual(len(commits), 1,
                             self.ref_out)
        v = subprocess.run([MUSTER, "ckpt", "verify", ckpt], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(v.returncode, 0, v.stdout + v.stderr)

    def interrupt_and_resume(self, name, sig, after):
        ckpt = os.path.join(self.root, name)
        run = MusterRun(ckpt)
        self.assertTrue(run.wait_output(after, 90), run.out)
        run.proc.send_signal(sig)
        code = run.wait(60)
        self.assertNotEqual(code, 0, run.out)
        latest = muster_latest(ckpt)
        self.assertGreaterEqual(latest, 8, run.out)
        again = MusterRun(ckpt)
        self.assertEqual(again.wait(120), 0, again.out)
        self.assertIn(f"resumed from step {latest}", again.out)
        self.assertEqual(field(again.out, "MUSTER_DONE", "param_digest"), self.want, again.out)
        return run, latest

    def test_sigkill_after_a_commit_then_resume_matches(self):
        self.interrupt_and_resume("kill", signal.SIGKILL, "MUSTER_CHECKPOINT step=8 ")  # then seconds=

    def test_sigterm_notice_saves_the_agreed_step_then_resume_matches(self):
        at = random.randint(9, STEPS - 3)
        run, latest = self.interrupt_and_resume("term", signal.SIGTERM,
                                                f"MUSTER_PROGRESS step={at} ")
        preempted = int(field(run.out, "MUSTER_PREEMPTED", "step"))
        self.assertEqual(latest, preempted, run.out)  # the notice's step was committed
        self.assertIn(f"MUSTER_CHECKPOINT step={preempted}", run.out)


def muster_latest(ckpt_dir):
    committed = [int(n[5:]) for n in os.listdir(ckpt_dir)
                 if n.startswith("step-") and not n.endswith(".tmp")
                 and os.path.exists(os.path.join(ckpt_dir, n, "MANIFEST"))]
    return max(committed)


@unittest.skipUnless(MUSTER, "MUSTER_BIN is not set (ctest sets it)")
class PytorchDdpUnderSubmitTest(unittest.TestCase):
    """The same script as a job submitted to a real coordinator and run by real node agents:
    preempted on its node at a random step, it checkpoints the step its ranks agree on, is
    requeued onto the other node, resumes from that step (MUSTER_RESUME_STEP) and ends with the
    parameters of an uninterrupted run."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="muster-ddp-submit-")
        self.keys = os.path.join(self.root, "keys")
        self.procs = []
        subprocess.run([MUSTER, "keys", "init", "--dir", self.keys], check=True,
                       stdout=subprocess.DEVNULL)
        data = os.path.join(self.root, "coord")
        os.makedirs(data)
        self.spawn("coord", [MUSTER, "coordinator", "--data-dir", data, "--keys", self.keys,
                             "--listen", "tcp://127.0.0.1:*", "--heartbeat-interval-ms", "200",
                             "--rendezvous-port-base", str(self.claim_ports()),
                             "--heartbeat-timeout-ms", "2000"])
        deadline = time.time() + 20
        while not os.path.exists(os.path.join(data, "endpoint")) and time.time() < deadline:
            time.sleep(0.05)
        with open(os.path.join(data, "endpoint")) as f:
            self.endpoint = f.read().strip()
        volume = os.path.join(self.root, "volume")
        os.makedirs(volume)
        for name in ("aws-1", "aws-2"):
            self.spawn(name, [MUSTER, "agent", "--coordinator", self.endpoint, "--keys",
                              self.keys, "--provider", "aws", "--name", name, "--slots", "2",
                              "--gpus", "0", "--volume", "ckpt=" + volume, "--work-dir",
                              os.path.join(self.root, name)])

    def claim_ports(self):
        """A range of 1000 ports no other test uses meanwhile (tests/testing/port_range.h)."""
        os.makedirs("/tmp/muster-test-ports", exist_ok=True)
        while True:
            for i in range(19):
                base = 10000 + ((os.getpid() + i) % 19) * 1000
                f = open(f"/tmp/muster-test-ports/{base}.lock", "a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.close()
                    continue
                self.port_lock = f  # held until the test object goes
                return base
            time.sleep(0.1)

    def tearDown(self):
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.port_lock.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def spawn(self, name, argv):
        with open(os.path.join(self.root, name + ".log"), "w") as log:
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    def muster(self, *args):
        r = subprocess.run([MUSTER, *args, "--coordinator", self.endpoint, "--keys", self.keys],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return r.stdout

    def status(self, job):
        import json
        st = json.loads(self.muster("status", job, "--json"))
        return st[0] if isinstance(st, list) else st

    def wait_for(self, pred, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return True
            time.sleep(0.2)
        return pred()

    def test_preempted_job_resumes_on_the_other_node_from_the_agreed_step(self):
        import json
        nodes = json.loads(self.muster("nodes", "--json"))
        self.assertTrue(self.wait_for(
            lambda: sum(n["state"] == "up" for n in json.loads(self.muster("nodes", "--json")))
            == 2, 20), nodes)
        spec = os.path.join(self.root, "ddp.yaml")
        with open(spec, "w") as f:
            f.write("name: ddp\n"
                    f"command: [{sys.executable!r}, {TRAIN!r}, " +
                    # 0.25 s a step: the status (heartbeat-paced) sees step `at` well before
                    # the last step, so the notice lands mid-run even on an idle machine.
                    ", ".join(repr(a) for a in ARGS + ["--step-delay", "0.25"]) + "]\n"
                    "nodes: 1\nranks_per_node: 2\n"
                    "checkpoint:\n  volume: ckpt\n")
        job = self.muster("submit", spec).strip()
        at = random.randint(4, 8)  # leaves 12+ steps for the notice to arrive under load
        self.assertTrue(self.wait_for(
            lambda: self.status(job).get("progress", {}).get("step", 0) >= at, 120),
            self.muster("events", job))
        victim = self.status(job)["nodes"][0]
        self.muster("node", "preempt", victim, "--notice", "30")
        self.assertTrue(self.wait_for(lambda: self.status(job)["state"] == "succeeded", 150),
                        self.muster("events", job))
        st = self.status(job)
        self.assertEqual(st["attempt"], 2, self.muster("events", job))
        self.assertEqual(st["preemptions"], 1)
        self.assertNotEqual(st["nodes"][0], victim)
        first = self.muster("logs", job, "--rank", "0", "--attempt", "1")
        second = self.muster("logs", job, "--rank", "0")
        preempted_field = field(first, "MUSTER_PREEMPTED", "step")
        self.assertIsNotNone(preempted_field, "attempt 1's rank 0 log:\n" + first[-3000:] +
                             "\nevents:\n" + self.muster("events", job))
        preempted = int(preempted_field)
        self.assertGreaterEqual(preempted, at)
        self.assertEqual(st["resume_step"], preempted, "zero lost steps")
        self.assertIn(f"resumed from step {preempted}", second)
        self.assertIn("checkpoints: muster in", first)  # the package, from the agent's path
        self.assertIn("checkpoints: muster in", second)
        self.assertEqual(field(second, "MUSTER_DONE", "param_digest"),
                         getattr(PytorchDdpTest, "want", None) or self.reference_digest(), second)

    def reference_digest(self):
        codes, ranks, out = run_to_end(os.path.join(self.root, "ref"))
        self.assertEqual(codes, [0, 0], out)
        return field(ranks[0].out, "MUSTER_DONE", "param_digest")


if __name__ == "__main__":
    unittest.main(verbosity=2)
