#!/usr/bin/env python3
"""`muster ckpt adopt` and muster.adopt/extract: a finished Hugging Face checkpoint-N, DCP
directory or torch.save files become a committed step that `muster ckpt verify` accepts and
that extracts back byte for byte; a half-written one is refused, naming what is missing.
Run by ctest (label unit)."""

import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest
import zipfile

import numpy as np

import muster

MUSTER_BIN = os.environ.get("MUSTER_BIN", "")


def write_safetensors(path, tensors):
    header, blobs, pos = {}, [], 0
    for name, a in tensors.items():
        b = a.tobytes()
        header[name] = {"dtype": {"float32": "F32", "int64": "I64"}[str(a.dtype)],
                        "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_zip(path, payload=b"x" * 5000):
    # torch.save's format is a zip archive; the completeness rule only reads the zip framing.
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)


def tree(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


class AdoptTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="muster-adopt-")
        self.job = os.path.join(self.tmp, "job")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def hf(self, name="checkpoint-30"):
        d = os.path.join(self.tmp, "out", name)
        os.makedirs(d)
        with open(os.path.join(d, "trainer_state.json"), "w") as f:
            json.dump({"global_step": 30, "log_history": []}, f)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "gpt2"}, f)
        rng = np.random.default_rng(1)
        write_safetensors(os.path.join(d, "model.safetensors"),
                          {"w": rng.standard_normal((300, 700)).astype(np.float32),
                           "step": np.array([30])})
        write_zip(os.path.join(d, "optimizer.pt"))
        os.makedirs(os.path.join(d, "sub"))
        with open(os.path.join(d, "sub", "empty.txt"), "w"):
            pass
        return d

    def cli(self, *args):
        return subprocess.run([MUSTER_BIN, "ckpt"] + list(args), capture_output=True, text=True,
                              timeout=60)

    def test_hf_checkpoint_round_trip(self):
        if not MUSTER_BIN:
            self.skipTest("MUSTER_BIN not set")
        src = self.hf()
        out = self.cli("adopt", src, "--into", self.job)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("as step 30", out.stdout)
        v = self.cli("verify", self.job)
        self.assertEqual(v.returncode, 0, v.stdout + v.stderr)
        self.assertIn("step 30: ok", v.stdout + v.stderr)
        dest = os.path.join(self.tmp, "back")
        muster.extract(30, dest, dir=self.job)
        self.assertEqual(tree(dest), tree(src))
        # Adopting the same step again is refused; a second step goes beside it.
        again = self.cli("adopt", src, "--into", self.job)
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("already committed", again.stderr + again.stdout)
        r = muster.adopt(src, step=31, dir=self.job)
        self.assertEqual((r["step"], r["format"]), (31, "hf"))
        self.assertEqual(muster.Checkpointer(self.job, 0, 1).latest_step(), 31)

    def test_damaged_adopted_step_fails_verify_and_extract(self):
        src = self.hf()
        muster.adopt(src, dir=self.job)
        shard = os.path.join(self.job, "step-000000030", "shard-00000.bin")
        with open(shard, "r+b") as f:
            f.seek(5000)
            b = f.read(1)
            f.seek(5000)
            f.write(bytes([b[0] ^ 1]))
        with self.assertRaises(muster.DataLossError):
            muster.extract(30, os.path.join(self.tmp, "back"), dir=self.job)

    def test_half_written_hf_is_refused(self):
        src = self.hf()
        os.remove(os.path.join(src, "trainer_state.json"))
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.adopt(src, dir=self.job)
        self.assertIn("trainer_state.json is missing", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(self.job, "step-000000030")))

    def test_torn_safetensors_is_refused(self):
        src = self.hf("checkpoint-40")
        p = os.path.join(src, "model.safetensors")
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 100)
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.adopt(src, dir=self.job)
        self.assertIn("model.safetensors", str(e.exception))
        self.assertIn("torn", str(e.exception))

    def test_sharded_hf_needs_every_shard(self):
        src = self.hf("checkpoint-50")
        os.remove(os.path.join(src, "model.safetensors"))
        write_safetensors(os.path.join(src, "model-00001-of-00002.safetensors"),
                          {"a": np.zeros(3, dtype=np.float32)})
        with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                      "b": "model-00002-of-00002.safetensors"}}, f)
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.adopt(src, dir=self.job)
        self.assertIn("model-00002-of-00002.safetensors", str(e.exception))
        write_safetensors(os.path.join(src, "model-00002-of-00002.safetensors"),
                          {"b": np.ones(3, dtype=np.float32)})
        self.assertEqual(muster.adopt(src, dir=self.job)["step"], 50)

    def test_torn_optimizer_is_refused(self):
        src = self.hf("checkpoint-60")
        p = os.path.join(src, "optimizer.pt")
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.adopt(src, dir=self.job)
        self.assertIn("optimizer.pt", str(e.exception))

    def test_dcp_directory(self):
        src = os.path.join(self.tmp, "dcp")
        os.makedirs(src)
        for r in range(2):
            with open(os.path.join(src, f"__{r}_0.distcp"), "wb") as f:
                f.write(os.urandom(10000))
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.adopt(src, step=7, dir=self.job)
        self.assertIn(".metadata is missing", str(e.exception))
        with open(os.path.join(src, ".metadata"), "wb") as f:
            f.write(b"\x80\x04pickled-metadata")
        r = muster.adopt(src, step=7, dir=self.job)
        self.assertEqual(r["format"], "dcp")
        dest = os.path.join(self.tmp, "back")
        muster.extract(7, dest, dir=self.job)
        self.assertEqual(tree(dest), tree(src))

    def test_torch_save_files(self):
        src = os.path.join(self.tmp, "run")
        os.makedirs(src)
        write_zip(os.path.join(src, "step-100.pt"))
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.adopt(src, dir=self.job)
        self.assertIn("--step", str(e.exception))
        self.assertEqual(muster.adopt(src, step=100, dir=self.job)["format"], "torch")
        with open(os.path.join(src, "legacy.pt"), "wb") as f:
            f.write(b"\x80\x02legacy pickle" * 10)
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.adopt(src, step=101, dir=self.job)
        self.assertIn("legacy.pt", str(e.exception))

    def test_unknown_directory_is_refused(self):
        src = os.path.join(self.tmp, "notes")
        os.makedirs(src)
        with open(os.path.join(src, "readme.txt"), "w") as f:
            f.write("hi")
        with self.assertRaises(muster.InvalidArgumentError) as e:
            muster.adopt(src, step=1, dir=self.job)
        self.assertIn("not a checkpoint muster knows", str(e.exception))
        with self.assertRaises(muster.InvalidArgumentError):
            muster.adopt(os.path.join(self.tmp, "missing"), step=1, dir=self.job)

    def test_extract_of_a_tensor_step_is_refused(self):
        muster.Checkpointer(self.job, 0, 1).save(3, {"x": np.zeros(2)}).wait()
        with self.assertRaises(muster.FailedPreconditionError):
            muster.extract(3, os.path.join(self.tmp, "back"), dir=self.job)


if __name__ == "__main__":
    unittest.main()
