"""examples/train_digits.py --target triton on a machine without CUDA: the interpreter, set up before
triton is imported and said on screen, or a one-line refusal saying how."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU story: this machine has a CUDA GPU")


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_no_cuda_runs_the_interpreter_and_says_so():
    code = ("import sys; sys.path.insert(0, 'examples'); import train_digits as td\n"
            "assert 'triton' not in sys.modules\n"
            "print('device', td.triton_device())\n"
            "import triton.language as tl\n"
            "print('interpreted', type(tl.cdiv).__name__ == 'InterpretedFunction')\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "through Triton's interpreter (TRITON_INTERPRET=1)" in out.stdout
    assert "device cpu" in out.stdout and "interpreted True" in out.stdout


def test_interpreter_refused_is_one_line():
    out = _run("import sys; sys.path.insert(0, 'examples'); import train_digits as td; "
               "sys.exit(td.main(['--target', 'triton', '--epochs', '0']))", TRITON_INTERPRET="0")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "TRITON_INTERPRET=0" in lines[0] and "--target numpy" in lines[0], out.stderr
