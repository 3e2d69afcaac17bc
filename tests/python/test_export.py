#!/usr/bin/env python3
"""`muster ckpt export DIR --format safetensors`: the file is read back by an independent
reader (the header parsed by hand here, the data with numpy) and every tensor compared with
what was saved; --lora-only keeps the adapter, --prefix strips a prefix; bad requests fail
with a message. Run by ctest (label unit)."""

import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest

import numpy as np

import muster

MUSTER_BIN = os.environ.get("MUSTER_BIN", "")
NP = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I32": "<i4", "I64": "<i8", "U8": "|u1",
      "I8": "|i1", "BOOL": "|b1", "BF16": "<u2"}  # bf16 compared as its raw bits


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    meta = header.pop("__metadata__", {})
    out, end = {}, 0
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(body[a:b], dtype=NP[t["dtype"]]).reshape(t["shape"])
        end = max(end, b)
    assert end == len(body), (end, len(body))
    assert n % 8 == 0
    return out, meta, list(header)


@unittest.skipUnless(MUSTER_BIN, "MUSTER_BIN not set")
class ExportTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="muster-export-")
        self.job = os.path.join(self.tmp, "job")
        rng = np.random.default_rng(5)
        self.model = {
            "emb.weight": rng.standard_normal((50, 16)).astype(np.float32),
            "blocks.0.attn.lora_a": rng.standard_normal((4, 16)).astype(np.float32),
            "blocks.0.attn.lora_b": rng.standard_normal((16, 4)).astype(np.float16),
            "blocks.0.mlp.weight": rng.standard_normal((16, 16)),
            "count": np.arange(7, dtype=np.int64),
            "mask": rng.standard_normal(9) > 0,
            "small": np.arange(-4, 4, dtype=np.int8),
            "scalar": np.array(2.5, dtype=np.float32),
        }
        state = {"model": self.model, "step": 9}
        try:
            import torch
            self.bf16 = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).to(
                torch.bfloat16)
            state["model"] = dict(self.model, bf16=self.bf16)
        except ImportError:
            self.bf16 = None
        muster.Checkpointer(self.job, 0, 1).save(9, state).wait()

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def export(self, *args):
        return subprocess.run([MUSTER_BIN, "ckpt", "export", self.job, "--format",
                               "safetensors"] + list(args), capture_output=True, text=True,
                              timeout=60)

    def test_every_tensor_reads_back(self):
        out = os.path.join(self.tmp, "model.safetensors")
        r = self.export("--prefix", "model/", "-o", out)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        got, meta, order = read_safetensors(out)
        self.assertEqual(meta["muster_step"], "9")
        want = dict(self.model)
        for name, a in want.items():
            self.assertIn(name, got)
            self.assertEqual(got[name].dtype, a.dtype, name)
            self.assertEqual(got[name].shape, a.shape, name)
            self.assertEqual(got[name].tobytes(), a.tobytes(), name)
        if self.bf16 is not None:
            import torch
            self.assertEqual(got["bf16"].tobytes(),
                             self.bf16.view(torch.int16).numpy().tobytes())
        self.assertEqual(set(got), set(want) | ({"bf16"} if self.bf16 is not None else set()))

    def test_lora_only_is_the_adapter(self):
        out = os.path.join(self.tmp, "adapter_model.safetensors")
        r = self.export("--step", "9", "--lora-only", "--prefix", "model/", "-o", out)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        got, _, _ = read_safetensors(out)
        self.assertEqual(sorted(got), ["blocks.0.attn.lora_a", "blocks.0.attn.lora_b"])
        for name in got:
            self.assertEqual(got[name].tobytes(), self.model[name].tobytes())

    def test_bad_requests_fail_with_a_message(self):
        out = os.path.join(self.tmp, "x.safetensors")
        r = self.export("--step", "10", "-o", out)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("10", r.stderr + r.stdout)
        r = self.export("--prefix", "nothing/", "-o", out)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("nothing/", r.stderr + r.stdout)
        r = subprocess.run([MUSTER_BIN, "ckpt", "export", self.job, "--format", "gguf", "-o",
                            out], capture_output=True, text=True, timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("gguf", r.stderr + r.stdout)
        self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
