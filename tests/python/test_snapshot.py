#!/usr/bin/env python3
"""muster's in-memory snapshots from Python (python/muster/snapshot.py) against a real agent-side
SnapshotServer and SnapshotStore (muster-py-snapshot-server, built from node_agent/snapshots/):
a nested torch/numpy state round-trips bit-exact through the agent's memory, resume() picks the
snapshot when MUSTER_RESUME_SNAPSHOT_STEP is set, the agent's refusal reaches flush(), and torn
or hostile payloads (truncated, a lying index, a skeleton that does not match the tensors, a
pickled global) raise a clear muster error without crashing the interpreter. Run by ctest
(label unit)."""

import os
import pickle
import ctypes
import random
import select
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import numpy as np
import torch

import muster
from muster import _core
from muster._state import Leaf
from muster.checkpoint import _METADATA_MAGIC, _describe
from muster.snapshot import restore_payload

SERVER = os.environ["MUSTER_PY_SNAPSHOT_SERVER"]
JOB = "pysnap-job"


def allow_reads_by(pid):
    """Lets `pid` read this process's memory where Yama's ptrace scope would stop a child from
    reading its parent (an agent reads its ranks as their parent; here the server is the test's
    child). A no-op without Yama."""
    PR_SET_PTRACER = 0x59616D61
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PTRACER, ctypes.c_ulong(pid), 0, 0, 0)


class Server:
    """muster-py-snapshot-server at a fresh socket; stopped by closing its stdin. With
    `stderr`, its log is read through wait_for_log."""

    def __init__(self, root, name, memory_bytes, stderr=False):
        self.socket = os.path.join(root, name, "snap.sock")
        self.proc = subprocess.Popen([SERVER, self.socket, str(memory_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE if stderr else None)
        line = self.proc.stdout.readline()
        assert line == b"ready\n", line
        allow_reads_by(self.proc.pid)
        self.log = b""

    def wait_for_log(self, text, timeout=10.0):
        """Whether the server logs `text` within `timeout` s."""
        end = time.monotonic() + timeout
        while text.encode() not in self.log:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stderr], [], [], left)[0]:
                return False
            chunk = os.read(self.proc.stderr.fileno(), 65536)
            if not chunk:
                return False
            self.log += chunk
        return True

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()
        if self.proc.stderr:
            self.proc.stderr.close()


def set_env(**values):
    """Replaces the env contract of this process by `values` (strings)."""
    for k in list(os.environ):
        if k.startswith("MUSTER_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                            "LOCAL_WORLD_SIZE"):
            del os.environ[k]
    os.environ.update({k: str(v) for k, v in values.items()})


def training_state():
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()  # the optimizer's state: exp_avg, exp_avg_sq and a 0-d "step" tensor per param
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "epoch": 3,
        "name": "run-a",
        "lr": [0.1, (2, None)],
        "array": np.arange(12, dtype=np.float32).reshape(3, 4),
        "npscalar": np.float64(2.5),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "int16": torch.arange(6, dtype=torch.int16),  # stored as raw bytes
        "rows": muster.RowShard(torch.full((2, 3), 1.5)),
        "mine": muster.PerRank(torch.tensor([9, 8, 7])),
    }


def assert_same(test, got, want, path="state"):
    if isinstance(want, (muster.RowShard, muster.PerRank)):
        want = want.tensor
    if isinstance(want, dict):
        test.assertEqual(list(got.keys()), list(want.keys()), path)
        for k in want:
            assert_same(test, got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        test.assertEqual(type(got), type(want), path)
        test.assertEqual(len(got), len(want), path)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(test, g, w, f"{path}[{i}]")
    elif isinstance(want, torch.Tensor):
        test.assertIsInstance(got, torch.Tensor, path)
        test.assertEqual(got.dtype, want.dtype, path)
        test.assertEqual(got.shape, want.shape, path)
        test.assertTrue(torch.equal(got, want), path)
    elif isinstance(want, np.ndarray):
        test.assertIsInstance(got, np.ndarray, path)
        test.assertEqual(got.dtype, want.dtype, path)
        np.testing.assert_array_equal(got, want, path)
    else:
        test.assertEqual(type(got), type(want), path)
        test.assertEqual(got, want, path)


def payload_of(tensors, skeleton, magic=_METADATA_MAGIC):
    """A payload in checkpoint/snapshot_state's encoding: `tensors` {name: torch tensor}
    (replicated) and `skeleton` pickled as the Python metadata."""
    refs, keep = [], []
    for name, t in tensors.items():
        r = _core.Tensor()
        r.name, r.dtype, r.shape, r.replicated = name, "f32", list(t.shape), True
        r.data = t.data_ptr()
        refs.append(r)
        keep.append(t)
    return _core.encode_snapshot_state(refs, magic + pickle.dumps(skeleton, protocol=4))


class SnapshotTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="pysnap-test-")
        cls.server = Server(cls.root, "agent", 64 << 20)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.root, ignore_errors=True)

    def job(self):
        """A job id of this test's own (the agent refuses a job's older attempts)."""
        return JOB + "-" + self._testMethodName[5:40].replace("_", "-")

    def rank_env(self, rank=1, world=2, attempt=0, **extra):
        set_env(RANK=rank, WORLD_SIZE=world, MUSTER_JOB_ID=self.job(), MUSTER_ATTEMPT=attempt,
                MUSTER_SNAPSHOT_EVERY=2, MUSTER_SNAPSHOT_SOCKET=self.server.socket, **extra)

    def test_state_round_trips_through_the_agent_and_resume_picks_the_snapshot(self):
        self.rank_env(attempt=1)
        state = training_state()
        snap = muster.Snapshotter()
        self.assertTrue(snap.enabled)
        self.assertEqual(snap.every, 2)
        self.assertEqual(muster.snapshot_every(), 2)
        self.assertFalse(snap.maybe_snapshot(3, lambda: self.fail("not due: not called")))
        self.assertTrue(snap.maybe_snapshot(4, lambda: state))
        # The copy is taken when snapshot returns: later in-place updates are not in it.
        want = {k: v for k, v in state.items()}
        want["model"] = {k: v.clone() for k, v in state["model"].items()}
        for v in state["model"].values():
            v.add_(1.0)
        snap.flush(10)
        self.assertEqual(snap.sent, 1)

        got = muster.load_snapshot(4, attempt=1)
        assert_same(self, got, want)
        self.assertEqual(got["optim"]["state"][0]["step"].dim(), 0)  # 0-d tensors too

        # The next attempt resumes from it: resume() reads it back from the agent.
        self.rank_env(attempt=2, MUSTER_RESUME_SNAPSHOT_STEP=4, MUSTER_RESUME_SNAPSHOT_ATTEMPT=1)
        self.assertEqual(muster.resume_snapshot_step(), 4)
        r = muster.resume()
        self.assertEqual((r.step, r.source), (4, "snapshot"))
        assert_same(self, r.state, want)
        # The model and the optimizer take it back.
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 4))
        model.load_state_dict(r.state["model"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.load_state_dict(r.state["optim"])

    def test_hold_lets_the_agent_read_in_place_and_its_end_waits_for_the_read(self):
        self.rank_env(attempt=4)
        state = training_state()
        want = dict(state)
        want["model"] = {k: v.clone() for k, v in state["model"].items()}
        snap = muster.Snapshotter()
        with snap.maybe_hold(3, lambda: self.fail("not due: not called")) as taken:
            self.assertFalse(taken)
        with snap.maybe_hold(4, lambda: state) as taken:
            self.assertTrue(taken)
            self.assertTrue(snap._sender.held)
        self.assertFalse(snap._sender.held)
        # Released: whatever the agent keeps was read before this, so changing the tensors now
        # does not reach it.
        for v in state["model"].values():
            v.add_(1.0)
        snap.flush(10)
        self.assertEqual((snap.sent, snap.given_up), (1, 0))
        self.assertTrue(snap.in_place)  # the agent did not say it cannot read: no copy
        assert_same(self, muster.load_snapshot(4, attempt=4), want)

        # The explicit form; the next snapshot (copying or not) releases the one held first.
        snap.snapshot_in_place(6, state)
        with self.assertRaisesRegex(muster.InvalidArgumentError, "not after the last"):
            snap.snapshot_in_place(6, state)
        snap.snapshot(8, state)
        self.assertFalse(snap._sender.held)
        snap.flush(10)
        self.assertEqual(snap.sent, 3)
        for step in (6, 8):
            assert_same(self, muster.load_snapshot(step, attempt=4), state)
        # The module-level form on the process's Snapshotter.
        muster._snapshotter = None
        with muster.maybe_hold(10, lambda: state) as taken:
            self.assertTrue(taken)
        muster.snapshotter().flush(10)
        assert_same(self, muster.load_snapshot(10, attempt=4), state)
        muster._snapshotter = None

    def test_the_agent_reads_when_it_gets_to_it_not_when_hold_is_called(self):
        # Against the rule on purpose, to show where the bytes come from: the agent is stopped
        # while the snapshot is taken, the tensor changes, then the agent reads. A copy taken by
        # the call would hold the old value; a read in place holds the new one.
        stopped = Server(self.root, "late", 64 << 20)
        try:
            set_env(RANK=0, WORLD_SIZE=1, MUSTER_JOB_ID=self.job(), MUSTER_ATTEMPT=0,
                    MUSTER_SNAPSHOT_EVERY=1, MUSTER_SNAPSHOT_SOCKET=stopped.socket)
            snap = muster.Snapshotter()
            w = torch.zeros(1000)
            os.kill(stopped.proc.pid, signal.SIGSTOP)
            try:
                snap.snapshot_in_place(1, {"w": w})
                time.sleep(0.2)  # the request waits in the stopped agent's socket
                w.fill_(5.0)
            finally:
                os.kill(stopped.proc.pid, signal.SIGCONT)
            self.assertTrue(snap.release(10))
            snap.flush(10)
            self.assertTrue(torch.equal(muster.load_snapshot(1, attempt=0)["w"],
                                        torch.full((1000,), 5.0)))
        finally:
            stopped.stop()

    def test_release_timeouts_are_checked_and_a_bad_one_still_releases(self):
        self.rank_env(rank=0, world=1, attempt=0)
        snap = muster.Snapshotter()
        for bad in (-1, float("nan"), 1e9, "5", True):
            with self.assertRaises(muster.InvalidArgumentError, msg=repr(bad)):
                snap.release_timeout = bad
        self.assertEqual(snap.release_timeout, 10.0)
        snap.snapshot_in_place(2, {"w": torch.ones(10)})
        with self.assertRaisesRegex(muster.InvalidArgumentError, "timeout must be"):
            snap.release(-5)
        self.assertFalse(snap._sender.held)  # released before raising
        snap.flush(10)
        self.assertEqual(snap.sent, 1)

    def test_a_read_that_does_not_come_in_time_is_given_up_and_training_goes_on(self):
        stopped = Server(self.root, "stopped", 64 << 20, stderr=True)
        try:
            set_env(RANK=0, WORLD_SIZE=1, MUSTER_JOB_ID=self.job(), MUSTER_SNAPSHOT_EVERY=1,
                    MUSTER_SNAPSHOT_SOCKET=stopped.socket)
            snap = muster.Snapshotter()
            snap.release_timeout = 0.3
            w = torch.ones(100000)
            os.kill(stopped.proc.pid, signal.SIGSTOP)  # an agent that cannot read now
            try:
                began = time.monotonic()
                with self.assertLogs("muster.snapshot", "WARNING") as logs:
                    with snap.hold(2, {"w": w}):
                        pass
                waited = time.monotonic() - began
            finally:
                os.kill(stopped.proc.pid, signal.SIGCONT)
            self.assertEqual(snap.given_up, 1)
            self.assertLess(waited, 5.0)
            self.assertIn("step 2 given up", logs.output[0])
            w.fill_(7.0)  # free to change: the agent keeps nothing of step 2's read
            # The agent, running again, reads the request it had queued, finds the connection
            # shut down, and drops what it read.
            self.assertTrue(stopped.wait_for_log("step 2: the rank went away or gave up while it "
                                                 "was read; not kept"), stopped.log)
            set_env(RANK=0, WORLD_SIZE=1, MUSTER_JOB_ID=self.job(), MUSTER_ATTEMPT=0,
                    MUSTER_SNAPSHOT_EVERY=1, MUSTER_SNAPSHOT_SOCKET=stopped.socket)
            with self.assertRaises(muster.NotFoundError):
                muster.load_snapshot(2, attempt=0)
            # The next one goes through.
            snap.release_timeout = 10.0
            with snap.hold(3, {"w": w}):
                pass
            snap.flush(10)
            self.assertEqual((snap.sent, snap.given_up), (1, 1))
            self.assertTrue(torch.equal(muster.load_snapshot(3, attempt=0)["w"], w))
        finally:
            stopped.stop()

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device (runs in the GPU check)")
    def test_cuda_tensors_go_through_reused_host_buffers(self):
        self.rank_env(rank=0, world=1, attempt=0)
        torch.manual_seed(3)
        model = torch.nn.Linear(8, 4).cuda()
        state = {"model": model.state_dict(), "ids": torch.arange(5, device="cuda"),
                 "cpu": torch.ones(3)}
        snap = muster.Snapshotter()
        snap.snapshot(1, state)
        snap.flush(10)  # sent before step 2 is taken (an unsent one would be replaced)
        buffers = dict(snap._host)
        self.assertEqual(sorted(buffers), ["ids", "model/bias", "model/weight"])
        with torch.no_grad():
            model.weight.add_(1.0)  # after snapshot() returned: not in step 1, in step 2
        snap.snapshot(2, state)
        for name, buf in buffers.items():
            self.assertIs(snap._host[name], buf, name)  # reused, not reallocated
        snap.flush(10)
        for step in (1, 2):
            got = muster.load_snapshot(step, attempt=0, device="cuda")
            self.assertEqual(got["model"]["weight"].device.type, "cuda")
            want = model.weight.detach() - (1.0 if step == 1 else 0.0)
            self.assertTrue(torch.equal(got["model"]["weight"], want), step)
            self.assertTrue(torch.equal(got["ids"].cpu(), torch.arange(5)))
            self.assertTrue(torch.equal(got["cpu"].cpu(), torch.ones(3)))

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device (runs in the GPU check)")
    def test_cuda_tensors_held_in_place_go_through_the_same_host_buffers(self):
        self.rank_env(rank=0, world=1, attempt=1)
        torch.manual_seed(4)
        model = torch.nn.Linear(8, 4).cuda()
        state = {"model": model.state_dict(), "cpu": torch.ones(3)}
        snap = muster.Snapshotter()
        with snap.hold(1, state):
            pass  # the agent reads the pinned host copies, not the GPU
        buffers = dict(snap._host)
        self.assertEqual(sorted(buffers), ["model/bias", "model/weight"])
        with torch.no_grad():
            model.weight.add_(1.0)  # after the block: not in step 1, in step 2
        with snap.hold(2, state):
            pass
        for name, buf in buffers.items():
            self.assertIs(snap._host[name], buf, name)  # reused once step 1 was released
        snap.flush(10)
        self.assertEqual(snap.given_up, 0)
        for step in (1, 2):
            got = muster.load_snapshot(step, attempt=1, device="cuda")
            want = model.weight.detach() - (1.0 if step == 1 else 0.0)
            self.assertTrue(torch.equal(got["model"]["weight"], want), step)
            self.assertTrue(torch.equal(got["cpu"].cpu(), torch.ones(3)))

    def test_steps_must_increase_and_bad_input_is_refused(self):
        self.rank_env(rank=0, world=1, attempt=3)
        snap = muster.Snapshotter()
        snap.snapshot(2, {"w": torch.ones(3)})
        with self.assertRaisesRegex(muster.InvalidArgumentError, "not after the last"):
            snap.snapshot(2, {"w": torch.ones(3)})
        with self.assertRaisesRegex(muster.InvalidArgumentError, "step must be an int"):
            snap.snapshot(-1, {"w": torch.ones(3)})
        with self.assertRaisesRegex(TypeError, "muster.snapshot: .* cannot be saved"):
            snap.snapshot(4, {"f": lambda: 1})
        with self.assertRaisesRegex(TypeError, r"muster.snapshot: state\['s'\] is a "
                                    "torch.sparse_coo tensor"):
            snap.snapshot(4, {"s": torch.eye(2).to_sparse()})
        snap.flush(10)

    def test_without_snapshots_nothing_is_sent_and_restore_says_why(self):
        set_env(RANK=0, WORLD_SIZE=1, MUSTER_JOB_ID=JOB)
        snap = muster.Snapshotter()
        self.assertFalse(snap.enabled)
        self.assertEqual(muster.snapshot_every(), 0)
        self.assertFalse(snap.maybe_snapshot(4, {"w": torch.ones(1)}))
        with self.assertRaisesRegex(muster.FailedPreconditionError, "snapshot_every_steps"):
            snap.snapshot(4, {"w": torch.ones(1)})
        with self.assertRaisesRegex(muster.FailedPreconditionError,
                                    "MUSTER_RESUME_SNAPSHOT_STEP is unset"):
            muster.load_snapshot()
        # resume() without a snapshot to resume from goes to the volume (here: nothing yet).
        ck = muster.Checkpointer(os.path.join(self.root, "vol"), 0, 1)
        self.assertEqual(tuple(muster.resume(ck)), (None, None, "fresh"))
        ck.save(6, {"w": torch.full((2,), 6.0)}).wait()
        r = muster.resume(ck)
        self.assertEqual((r.step, r.source), (6, "volume"))
        self.assertTrue(torch.equal(r.state["w"], torch.full((2,), 6.0)))

    def test_a_snapshot_the_agent_does_not_hold_is_not_found(self):
        self.rank_env(attempt=5, MUSTER_RESUME_SNAPSHOT_STEP=40, MUSTER_RESUME_SNAPSHOT_ATTEMPT=4)
        with self.assertRaisesRegex(muster.NotFoundError, "step 40 of attempt 4"):
            muster.resume()

    def test_the_agents_refusal_reaches_flush(self):
        small = Server(self.root, "small", 64 << 10)
        try:
            set_env(RANK=0, WORLD_SIZE=1, MUSTER_JOB_ID=self.job(), MUSTER_SNAPSHOT_EVERY=1,
                    MUSTER_SNAPSHOT_SOCKET=small.socket)
            snap = muster.Snapshotter()
            # Two steps of 40 KiB do not fit in 64 KiB: the agent reads the frame, refuses it.
            snap.snapshot(1, {"w": torch.zeros(10000)})  # returns: the send is not waited on
            with self.assertRaisesRegex(muster.FailedPreconditionError, "limit"):
                snap.flush(10)
            # 400 KiB: refused from the frame's header, before its bytes are read (the agent
            # closes the connection): still the agent's reason, not a broken pipe.
            snap.snapshot(2, {"w": torch.zeros(100000)})
            with self.assertRaisesRegex(muster.DataLossError, "exceeds the limit of 65536"):
                snap.flush(10)
            self.assertEqual(snap.sent, 0)
        finally:
            small.stop()

    # -- torn and hostile payloads -------------------------------------------------------------

    def put(self, step, payload, attempt=6):
        _core.put_snapshot(self.server.socket, self.job(), attempt, 0, 1, step, payload)
        set_env(RANK=0, WORLD_SIZE=1, MUSTER_JOB_ID=self.job(), MUSTER_ATTEMPT=attempt + 1,
                MUSTER_SNAPSHOT_SOCKET=self.server.socket, MUSTER_RESUME_SNAPSHOT_STEP=step,
                MUSTER_RESUME_SNAPSHOT_ATTEMPT=attempt)

    def test_a_torn_payload_is_data_loss(self):
        good = payload_of({"w": torch.ones(64)},
                          {"w": Leaf("w", "torch", "float32", (64,), "replicated")})
        self.put(10, good[:len(good) // 2])  # checksummed as sent: only its content is torn
        with self.assertRaisesRegex(muster.DataLossError, "snapshot state"):
            muster.resume()
        self.put(11, good)
        self.assertTrue(torch.equal(muster.resume().state["w"], torch.ones(64)))

    def test_a_skeleton_that_does_not_match_the_tensors_is_data_loss(self):
        # The index holds 1000 floats; the skeleton asks for 2 (a copy would overrun), for a
        # 0-d tensor (a whole-tensor request), for another dtype, or for a tensor not there.
        t = {"w": torch.ones(1000)}
        for leaf, msg in [(Leaf("w", "torch", "float32", (2,), "replicated"), "held as f32"),
                          (Leaf("w", "torch", "float32", (), "replicated"), "held as f32"),
                          (Leaf("w", "torch", "float64", (1000,), "replicated"), "held as f32"),
                          (Leaf("v", "torch", "float32", (1000,), "replicated"), "no tensor 'v'"),
                          (Leaf("w", "numpy", "O", (1000,), "replicated"), "Python objects"),
                          (Leaf("w", "torch", "save", (1000,), "replicated"), "torch dtype"),
                          (Leaf("w", "torch", "float32", (-1,), "replicated"), "malformed"),
                          # No allocation of what the lying skeleton claims.
                          (Leaf("w", "torch", "float32", (1 << 50,), "replicated"),
                           "held as f32")]:
            with self.subTest(leaf=leaf):
                p = _core.SnapshotPayload(payload_of(t, {"x": leaf}))
                with self.assertRaisesRegex(muster.DataLossError, msg):
                    restore_payload(p, 1)

    def test_a_pickled_global_is_refused_not_run(self):
        hostile = payload_of({}, {"x": os.system})
        with self.assertRaisesRegex(muster.FailedPreconditionError, "posix.system|os.system"):
            restore_payload(_core.SnapshotPayload(hostile), 1)
        with self.assertRaisesRegex(muster.FailedPreconditionError, "not taken by"):
            restore_payload(_core.SnapshotPayload(payload_of({}, {}, magic=b"other")), 1)
        with self.assertRaisesRegex(muster.DataLossError, "does not unpickle"):
            restore_payload(_core.SnapshotPayload(
                _core.encode_snapshot_state([], _METADATA_MAGIC + b"\x80\x04garbage")), 1)

    def test_random_damage_never_crashes(self):
        refs, keep, meta, _ = _describe(training_state(), 0, 1, "test")
        good = _core.encode_snapshot_state(refs, meta)
        restore_payload(_core.SnapshotPayload(good), 1)
        rng = random.Random(1234)
        for i in range(300):
            b = bytearray(good)
            kind = i % 3
            if kind == 0:
                b = b[:rng.randrange(len(b))]
            else:
                for _ in range(rng.randint(1, 8)):
                    at = rng.randrange(min(len(b), 4 + 2000) if kind == 1 else len(b))
                    b[at] = rng.randrange(256)
            try:
                restore_payload(_core.SnapshotPayload(bytes(b)), 1)
            except muster.Error:
                pass  # any clear muster error; the point is: no crash, no hang


if __name__ == "__main__":
    unittest.main()
