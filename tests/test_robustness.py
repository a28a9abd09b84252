"""Never silently wrong, never a hang (issue 11, items 6-8): ``derive "EXPR" --at`` evaluates within a
budget, generation's leftovers and hand edits do not fool ``--check``, and file-system failures are
one-line errors naming the path.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad import cli
from symgrad.cli import main

NESTED_SIGMOIDS = "sigmoid(" * 16 + "x" + ")" * 16


def run(*args: str, timeout: float = 60, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "symgrad", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return r, time.perf_counter() - start


def call(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("symgrad: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------
# item 6: derive "EXPR" --at: fixed precision, a time and size budget


@pytest.mark.parametrize(
    "expr, wrt, at",
    [
        ("x**y", "x,y", "x=2,y=1e12"),
        ("x**y", "x,y", "x=-2,y=1e12"),
        ("x**x**x", "x", "x=9"),
        ("exp(exp(exp(x)))", "x", "x=100"),
        (NESTED_SIGMOIDS, "x", "x=1"),
    ],
    ids=["pow-1e12", "neg-pow-1e12", "tower-9", "exp3-100", "sigmoid16"],
)
def test_values_at_a_point_are_fast(expr, wrt, at):
    """Each of these hung (or took minutes and gigabytes) while SymPy computed exactly."""
    r, elapsed = run("derive", expr, "--wrt", wrt, "--at", at, "--format", "json", timeout=60)
    assert elapsed < 8.0, f"{elapsed:.1f} s"  # a subprocess: Python and SymPy start in about 1 s of it
    if r.returncode == 0:
        values = json.loads(r.stdout)["values"]
        for v in [values["expr"], *values["gradients"].values()]:
            assert isinstance(v, float) or v in ("inf", "-inf", "nan", "zoo"), v
    else:
        line = one_line_error(r)
        assert "evaluating" in line and at.split(",")[0] in line, line


def test_overflow_is_stated_as_inf():
    r, _ = run("derive", "x**y", "--wrt", "x,y", "--at", "x=2,y=1e12", "--format", "json")
    assert r.returncode == 0, r.stderr
    values = json.loads(r.stdout)["values"]
    assert values["expr"] == "inf" and values["gradients"] == {"x": "inf", "y": "inf"}


def test_nested_sigmoids_value_is_right(capsys):
    code, out, err = call(capsys, "derive", NESTED_SIGMOIDS, "--wrt", "x", "--at", "x=1", "--format", "json")
    assert code == 0, err
    v, d = 1.0, 1.0
    for _ in range(16):
        v = 1.0 / (1.0 + math.exp(-v))
        d *= v * (1.0 - v)
    values = json.loads(out)["values"]
    assert values["expr"] == pytest.approx(v, rel=1e-14)
    assert values["gradients"]["x"] == pytest.approx(d, rel=1e-13)


def test_undefined_after_overflow_is_an_error_naming_what_overflowed(capsys):
    # x**y/x**y is 1, but each power exceeds any fixed-precision range: no value rather than a wrong one
    code, out, err = call(capsys, "derive", "x**y - x**y*x/x + x", "--wrt", "x", "--at", "x=3,y=1e12")
    if code == 0:  # SymPy simplified the expression away: then the value must be right
        assert "f     = 3.0" in out
    else:
        assert code == 2 and out == "" and len(err.splitlines()) == 1


def test_inf_minus_inf_is_an_error_not_nan(capsys):
    code, out, err = call(capsys, "derive", "exp(x) - exp(2*x)/exp(x)*y", "--wrt", "y", "--at", "x=1e6,y=1")
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("symgrad: error: evaluating the expression at x=1e6,y=1:") and "exceeds 2**4096" in err, err


def test_time_budget_for_values(capsys, monkeypatch):
    from symgrad import atpoint

    monkeypatch.setattr(atpoint, "TIME_LIMIT_S", 0.0)
    code, out, err = call(capsys, "derive", "x*sigmoid(x)", "--wrt", "x", "--at", "x=2")
    assert code == 2 and out == ""
    assert "evaluating the expression at x=2: took longer than 0 s" in err, err


@pytest.mark.parametrize(
    "expr, at, expected",
    [
        ("x*sigmoid(x)", "x=2", (2 / (1 + math.exp(-2)),)),
        ("exp(x)", "x=1000", (math.inf,)),
        ("exp(-x)", "x=1000", (0.0,)),
        ("softplus(x)", "x=-50", (math.log1p(math.exp(-50)),)),
        ("log1p(x)", "x=1e-20", (1e-20,)),
        ("x**0.5", "x=2", (math.sqrt(2),)),
        ("1/x", "x=0", ("zoo",)),
        ("sqrt(x)", "x=-4", ("2.0*I",)),
        ("relu(x)", "x=0", (0.0,)),
        ("max(x, 1)", "x=1", (1.0,)),
    ],
)
def test_ordinary_values_unchanged(capsys, expr, at, expected):
    code, out, err = call(capsys, "derive", expr, "--wrt", "x", "--at", at, "--format", "json")
    assert code == 0, err
    got = json.loads(out)["values"]["expr"]
    if isinstance(expected[0], str):
        assert got == expected[0]
    else:
        assert got == pytest.approx(expected[0], rel=1e-15, abs=0)


def test_max_tie_and_power_at_zero(capsys):
    code, out, _ = call(capsys, "derive", "max(x,y)", "--wrt", "x", "--at", "x=1,y=1", "--format", "json")
    assert code == 0 and json.loads(out)["values"]["gradients"]["x"] == 0.5  # Heaviside(0) = 1/2
    code, out, _ = call(capsys, "derive", "x**y", "--wrt", "x", "--at", "x=0,y=0", "--format", "json")
    assert code == 0 and json.loads(out)["values"] == {"expr": 1.0, "gradients": {"x": "nan"}}


def test_too_many_wrt_variables_is_refused_fast():
    n = 200
    expr = "*".join(f"x{i}" for i in range(n))
    r, elapsed = run("derive", expr, "--wrt", ",".join(f"x{i}" for i in range(n)))
    line = one_line_error(r)
    assert f"--wrt names {n} variables; at most {cli.MAX_WRT}" in line
    assert elapsed < 8.0, f"{elapsed:.1f} s"


def test_derivative_size_is_bounded(capsys, monkeypatch):
    monkeypatch.setattr(cli, "MAX_DERIVATIVE_NODES", 50)
    code, out, err = call(capsys, "derive", NESTED_SIGMOIDS, "--wrt", "x")
    assert code == 2 and out == ""
    assert "d/dx is too large: more than 50 nodes when written out" in err, err


def test_derivation_time_is_bounded(capsys, monkeypatch):
    monkeypatch.setattr(cli, "DERIVE_TIME_LIMIT_S", 0.001)
    start = time.perf_counter()
    code, out, err = call(capsys, "derive", "*".join(f"x{i}" for i in range(30)), "--wrt", ",".join(f"x{i}" for i in range(30)))
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "took longer than 0.001 s" in err, err
    assert time.perf_counter() - start < 5


# ----------------------------------------------------------------------------------------------
# item 7: generation leftovers and hand edits do not fool --check


def _gen(capsys, *argv):
    from symgrad import generate

    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_leftover_temp_file_is_flagged_by_check_and_removed_by_generate(tmp_path, capsys):
    assert _gen(capsys, "relu", "--target", "numpy", "--out", str(tmp_path))[0] == 0
    # what a SIGKILL between mkstemp and os.replace leaves behind
    leftovers = [tmp_path / "numpy" / ".relu.py.k3x_9q2a.tmp", tmp_path / f".{'.manifest.json'}.abcdefgh.tmp"]
    for p in leftovers:
        p.write_text("# @generated by symgrad: half a mod")
    mine = tmp_path / "numpy" / ".notes.txt.tmp"  # not a temporary file generation makes: left alone
    mine.write_text("mine")
    code, out, err = _gen(capsys, "relu", "--target", "numpy", "--out", str(tmp_path), "--check")
    assert code == 1
    for p in leftovers:
        assert f"leftover: {p}" in out or f"leftover: {p.name}" in out or p.name in out, out
        assert p.exists()  # --check writes (and deletes) nothing
    assert "notes" not in out
    code, out, err = _gen(capsys, "relu", "--target", "numpy", "--out", str(tmp_path))
    assert code == 0 and "removed" in err
    assert not any(p.exists() for p in leftovers) and mine.exists()
    assert _gen(capsys, "relu", "--target", "numpy", "--out", str(tmp_path), "--check")[0] == 0


def test_leftover_after_a_real_sigkill(tmp_path):
    """Kill a real generate while it holds a temporary file; --check must notice, generate must clean."""
    import os
    import signal

    script = (
        "import os, sys, time\n"
        "from symgrad import generate\n"
        "real = os.replace\n"
        "def stuck(src, dst):\n"
        "    print('tmp', src, flush=True); time.sleep(60)\n"
        "os.replace = stuck\n"
        f"sys.exit(generate.main(['relu', '--target', 'numpy', '--out', {str(tmp_path)!r}]))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert line.startswith("tmp ") and os.path.exists(line.split(" ", 1)[1].strip())
    r, _ = run("generate", "relu", "--target", "numpy", "--out", str(tmp_path), "--check")
    assert r.returncode == 1 and "leftover:" in r.stdout, (r.stdout, r.stderr[-1000:])
    r, _ = run("generate", "relu", "--target", "numpy", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-1000:]
    assert not list(tmp_path.rglob("*.tmp"))
    r, _ = run("generate", "relu", "--target", "numpy", "--out", str(tmp_path), "--check")
    assert r.returncode == 0, (r.stdout, r.stderr[-1000:])


def test_hand_edit_with_its_sha_in_the_manifest_is_stale(tmp_path, capsys, monkeypatch):
    from symgrad import fingerprint

    monkeypatch.setattr(fingerprint.Inputs, "changed", lambda self: [])  # others may edit the checkout meanwhile
    assert _gen(capsys, "relu", "softmax", "--target", "numpy", "--out", str(tmp_path))[0] == 0
    module = tmp_path / "numpy" / "relu.py"
    module.write_text(module.read_text().replace("np.maximum", "np.minimum") + "# hand edit\n")
    manifest = tmp_path / fingerprint.MANIFEST_NAME
    data = json.loads(manifest.read_text())
    data["files"]["numpy/relu.py"]["sha256"] = fingerprint.file_sha256(module)  # the forged vouch
    manifest.write_text(json.dumps(data, indent=1))
    code, out, err = _gen(capsys, "relu", "softmax", "--target", "numpy", "--out", str(tmp_path), "--check")
    assert code == 1 and "stale:" in out and "numpy/relu.py" in out and "softmax" not in out


# ----------------------------------------------------------------------------------------------
# item 8: file-system failures are one-line user errors naming the path; the old file stays whole


def _assert_fs_error(code, out, err, *needles):
    assert code == 2, (code, out, err)
    errors = [l for l in err.splitlines() if l.startswith("symgrad: error: ")]
    assert len(errors) == 1 and "internal error" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], errors[0]


def test_out_naming_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("mine\n")
    code, out, err = _gen(capsys, "relu", "--target", "numpy", "--out", str(target))
    _assert_fs_error(code, out, err, "afile", "is a file, not a folder")
    assert target.read_text() == "mine\n"
    code, out, err = _gen(capsys, "relu", "--target", "numpy", "--out", str(target / "sub"))
    _assert_fs_error(code, out, err, "afile")


def test_full_disk_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    import errno
    import os

    from symgrad import generate

    assert _gen(capsys, "relu", "--target", "numpy", "--out", str(tmp_path))[0] == 0
    module = tmp_path / "numpy" / "relu.py"
    module.write_text(module.read_text() + "# older\n")
    before = module.read_bytes()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(generate.os, "fdopen", lambda fd, mode="r", *a, **k: Full(real_fdopen(fd, mode, *a, **k)))
    code, out, err = _gen(capsys, "relu", "--target", "numpy", "--out", str(tmp_path))
    _assert_fs_error(code, out, err, "writing", "relu.py", "No space left on device", "ENOSPC")
    assert module.read_bytes() == before  # never lost work: the old bytes, whole
    assert not list(tmp_path.rglob("*.tmp"))


def test_read_only_folder(tmp_path, capsys, monkeypatch):
    import tempfile

    from symgrad import generate

    assert _gen(capsys, "relu", "--target", "numpy", "--out", str(tmp_path))[0] == 0
    module = tmp_path / "numpy" / "relu.py"
    module.write_text(module.read_text() + "# older\n")
    before = module.read_bytes()

    def refuse(*a, dir=None, **k):  # what a read-only folder does (tests may run as root, where chmod does not)
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, out, err = _gen(capsys, "relu", "--target", "numpy", "--out", str(tmp_path))
    _assert_fs_error(code, out, err, "writing", "relu.py", "Permission denied", "EACCES")
    assert module.read_bytes() == before
