"""``symgrad generate``: reproducible, atomic, incremental writes, and ``--check``."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad import generate
from symgrad.declare import REGISTRY
from symgrad.targets import TARGETS, Target

ROOT = Path(__file__).resolve().parents[1]
FEW = ["relu", "softmax", "conv2d"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv, capsys):
    code = generate.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_output_is_identical_whatever_the_hash_seed(tmp_path):
    procs = []
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        cmd = [sys.executable, "-m", "symgrad.generate", "--target", "numpy", "--out", str(tmp_path / seed)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    a, b = _files(tmp_path / "0"), _files(tmp_path / "4242")
    assert len(a) == len(REGISTRY.names()) + 2  # every op, plus generated/ and generated/numpy/ __init__.py
    assert a == b


def test_committed_generated_numpy_is_up_to_date(capsys):
    code, out, err = _run(["--check", "--target", "numpy"], capsys)
    assert code == 0, f"generated/numpy is stale; run `symgrad generate --target numpy`:\n{out}"


def test_check_lists_stale_and_missing_modules_and_writes_nothing(tmp_path, capsys):
    assert _run([*FEW, "--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    stale, missing = tmp_path / "numpy" / "relu.py", tmp_path / "numpy" / "softmax.py"
    stale.write_text(stale.read_text() + "# a hand edit\n")
    missing.unlink()
    before = _files(tmp_path)
    code, out, err = _run([*FEW, "--target", "numpy", "--out", str(tmp_path), "--check"], capsys)
    assert code == 1
    assert "stale:" in out and "relu.py" in out
    assert "missing:" in out and "softmax.py" in out
    assert "conv2d.py" not in out
    assert _files(tmp_path) == before  # --check wrote nothing
    assert _run([*FEW, "--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    assert _run([*FEW, "--target", "numpy", "--out", str(tmp_path), "--check"], capsys)[0] == 0


def test_unchanged_modules_are_not_rewritten(tmp_path, capsys):
    assert _run(["relu", "softmax", "--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    old = 1_000_000_000
    for p in tmp_path.rglob("*.py"):
        os.utime(p, ns=(old, old))
    code, out, err = _run(["relu", "softmax", "--target", "numpy", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert all(p.stat().st_mtime_ns == old for p in tmp_path.rglob("*.py"))
    assert "[1/2] relu numpy: unchanged" in err and "[2/2] softmax numpy: unchanged" in err
    assert "0 files written" in err and "s\n" in err  # summary with the time


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path, capsys, monkeypatch):
    assert _run(FEW + ["--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    # A failure between writing and renaming keeps the old file and removes the temporary one.
    target = tmp_path / "numpy" / "relu.py"
    old = target.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(generate.os, "replace", fail)
    with pytest.raises(OSError):
        generate.write_if_changed(target, "new contents\n")
    assert target.read_bytes() == old
    assert not list(target.parent.glob(".*"))  # the temporary file is gone


def test_missing_renderer_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(TARGETS, "nowhere", Target("nowhere", "symgrad.targets.no_such_renderer", ".py", "nowhere"))
    args = argparse.Namespace(ops=["relu"], target="nowhere", out=str(tmp_path), check=False)
    assert generate.run_generate(args) == 1
    err = capsys.readouterr().err
    assert "target nowhere: its renderer symgrad.targets.no_such_renderer does not exist" in err
    # Without --target, a renderer that does not exist is skipped with a note; the others still run.
    monkeypatch.setattr(generate, "resolve_targets", lambda target: ["numpy", "nowhere"])
    args = argparse.Namespace(ops=["relu"], target=None, out=str(tmp_path), check=False)
    assert generate.run_generate(args) == 0
    assert "note: skipping target nowhere" in capsys.readouterr().err
    assert (tmp_path / "numpy" / "relu.py").exists() and not (tmp_path / "nowhere").exists()


def test_unknown_op_is_a_usage_error(tmp_path, capsys):
    code, out, err = _run(["no_such_op", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown op(s) 'no_such_op'" in err
    assert not any(tmp_path.iterdir())


def test_orphaned_modules_are_reported(tmp_path):
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "relu.py").write_text("")
    (tmp_path / "numpy" / "retired_op.py").write_text("")
    assert [p.name for p in generate.orphans(tmp_path, ["relu"], ["numpy"])] == ["retired_op.py"]


def test_banner_names_the_declaration_and_the_command():
    text = generate.Renderer().render("conv2d", "numpy")
    assert text.startswith("# @generated by symgrad from op `conv2d` (symgrad/ops/conv.py): do not edit.\n")
    assert "# Regenerate with: symgrad generate conv2d --target numpy\n" in text


def test_symgrad_check_agrees_and_catches_a_wrong_gradient(capsys, monkeypatch):
    from symgrad import check

    assert check.run_check(argparse.Namespace(ops=["softmax", "conv2d"], seed=0)) == 0
    out = capsys.readouterr().out
    assert "softmax (B=3, C=5" in out and "finite differences vs generated" in out

    real = check.load_numpy_module

    def off_by_a_bit(program, name):  # a generated vjp whose gradient is 1% wrong
        mod = real(program, name)
        vjp = mod.vjp
        mod.vjp = lambda *a, **k: tuple(None if g is None else g * 1.01 for g in vjp(*a, **k))
        return mod

    monkeypatch.setattr(check, "load_numpy_module", off_by_a_bit)
    assert check.run_check(argparse.Namespace(ops=["softmax"], seed=0)) == 1
    assert "DISAGREE" in capsys.readouterr().out
