"""bench/bench_triton.py end to end at tiny sizes on CPU (``--smoke``: Triton interpreter,
``time.perf_counter`` timing). Checks the script runs and writes a complete result file; the
numbers themselves mean nothing under the interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_triton_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_triton.py"), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(tmp_path.glob("cpu-interpreter-*.json"))
    assert len(files) == 1, proc.stdout
    doc = json.loads(files[0].read_text())
    assert doc["smoke"] and doc["device"] == "cpu-interpreter"
    assert {"torch", "triton", "python"} <= set(doc["versions"])
    assert doc["date"]
    ops = {r["op"] for r in doc["results"]}
    assert ops == {"softmax_cross_entropy", "layer_norm", "rms_norm", "gelu", "swiglu", "linear", "conv2d"}
    for r in doc["results"]:
        assert r["minimal_bytes"]["fwd+bwd"] > 0
        for impl in ("symgrad", "eager", "compile"):
            e = r["impls"][impl]
            assert "error" not in e, (r["op"], impl, e)
            for k in ("fwd", "bwd", "fwd+bwd"):
                assert e[k]["median_ms"] > 0 and e[k]["p20_ms"] <= e[k]["p80_ms"]
            assert e["max_abs_grad_diff_vs_eager"] < 1e-3, (r["op"], impl)
    assert list(tmp_path.glob("cpu-interpreter-*.png"))
