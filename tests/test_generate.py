"""``symgrad generate``: reproducible, atomic, incremental writes, the manifest, and ``--check``."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad import fingerprint, generate
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
    assert len(a) == len(REGISTRY.names()) + 3  # every op, generated/ and generated/numpy/ __init__.py, the manifest
    assert a == b  # the manifest too: the same inputs give the same fingerprints whatever the hash seed
    entries = json.loads(a[fingerprint.MANIFEST_NAME])["files"]
    assert sorted(entries) == sorted(k for k in a if k != fingerprint.MANIFEST_NAME)
    assert all(e["sha256"] == fingerprint.sha256_bytes(a[k]) for k, e in entries.items())


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
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == [tmp_path / fingerprint.MANIFEST_NAME]
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


# ------------------------------------------------------------------------------------------------
# the manifest: skipping unchanged modules without deriving them


@pytest.fixture
def frozen_sources(tmp_path_factory, monkeypatch):
    """Fingerprints read a copy of the package sources and templates taken when the test starts
    (dated in the past), so that edits made to the checkout while tests run cannot change them."""
    root = tmp_path_factory.mktemp("sources")
    copies = []
    for path in fingerprint.source_files():
        copy = root / fingerprint._label(path)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
        os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
        copies.append(copy)
    monkeypatch.setattr(fingerprint, "source_files", lambda: list(copies))
    return copies


@pytest.fixture
def derivations(monkeypatch, frozen_sources):
    """Counts the ops derived (``Renderer.program`` computing a program) while a test runs."""
    counted = []
    real = generate.Renderer.program

    def program(self, op_name):
        if op_name not in self._programs:
            counted.append(op_name)
        return real(self, op_name)

    monkeypatch.setattr(generate.Renderer, "program", program)
    return counted


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.rglob("*"))}


def _fake_source(tmp_path: Path, monkeypatch, text: str) -> Path:
    """A file the fingerprints treat as one more package source (dated in the past, as an edit made
    before the run would be)."""
    extra = tmp_path / "extra_source.py"
    extra.write_text(text)
    os.utime(extra, ns=(1_000_000_000, 1_000_000_000))
    real = fingerprint.source_files
    monkeypatch.setattr(fingerprint, "source_files", lambda: [*real(), extra])
    return extra


def test_warm_run_derives_nothing_and_touches_no_file(tmp_path, capsys, derivations):
    out = tmp_path / "gen"
    assert _run([*FEW, "--target", "numpy", "--out", str(out)], capsys)[0] == 0
    assert sorted(derivations) == sorted(FEW)
    manifest = json.loads((out / fingerprint.MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == ["__init__.py", "numpy/__init__.py", "numpy/conv2d.py", "numpy/relu.py", "numpy/softmax.py"]
    before = _stamps(out)
    derivations.clear()
    code, out_, err = _run([*FEW, "--target", "numpy", "--out", str(out)], capsys)
    assert code == 0 and derivations == []
    assert "0 files written, 5 unchanged" in err and "0 ops derived in" in err
    assert _stamps(out) == before  # nothing written, not even the manifest
    # --check never takes the manifest's word: it renders every module and compares bytes
    code, out_, err = _run([*FEW, "--target", "numpy", "--out", str(out), "--check"], capsys)
    assert code == 0 and sorted(derivations) == sorted(FEW) and "came out identical" not in err
    assert _stamps(out) == before


def test_force_ignores_the_manifest(tmp_path, capsys, derivations):
    assert _run(["relu", "softmax", "--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    before = _stamps(tmp_path)
    derivations.clear()
    assert _run(["relu", "softmax", "--target", "numpy", "--out", str(tmp_path), "--force"], capsys)[0] == 0
    assert sorted(derivations) == ["relu", "softmax"]
    assert _stamps(tmp_path) == before  # same bytes, manifest included: nothing rewritten
    derivations.clear()
    assert _run(["relu", "softmax", "--target", "numpy", "--out", str(tmp_path), "--check", "--force"], capsys)[0] == 0
    assert sorted(derivations) == ["relu", "softmax"]


@pytest.mark.parametrize("change", ["sources", "environment", "declaration"])
def test_a_changed_input_is_derived_again(tmp_path, capsys, monkeypatch, derivations, change):
    out = tmp_path / "gen"
    extra = _fake_source(tmp_path, monkeypatch, "# version 1\n")
    assert _run([*FEW, "--target", "numpy", "--out", str(out)], capsys)[0] == 0
    files, manifest = _files(out), (out / fingerprint.MANIFEST_NAME).read_bytes()
    derivations.clear()
    if change == "sources":  # an edit to any package source or template
        extra.write_text("# version 2\n")
        os.utime(extra, ns=(1_000_000_000, 1_000_000_000))
        expected, note = sorted(FEW), "inputs changed: sources"
    elif change == "environment":  # another SymPy
        real = fingerprint.environment
        monkeypatch.setattr(fingerprint, "environment", lambda: {**real(), "sympy": "0.0.1"})
        expected, note = sorted(FEW), "sympy "
    else:  # one op's declaration (beyond its source file: a declaration built at run time)
        op = REGISTRY.get("relu")
        monkeypatch.setitem(REGISTRY._ops, "relu", dataclasses.replace(op, tolerances={**op.tolerances, "float16": (1e-2, 1e-2)}))
        expected, note = ["relu"], "inputs changed: "
    # --check derives the affected modules again; their bytes are the same, so nothing is stale.
    code, out_, err = _run([*FEW, "--target", "numpy", "--out", str(out), "--check"], capsys)
    assert code == 0, out_
    assert sorted(derivations) == sorted(FEW)  # --check renders every module, whatever the manifest says
    assert note in err and "came out identical" in err
    assert (out / fingerprint.MANIFEST_NAME).read_bytes() == manifest  # --check writes nothing
    # generate rewrites no module, records the new fingerprints, and the next run derives nothing.
    derivations.clear()
    code, out_, err = _run([*FEW, "--target", "numpy", "--out", str(out)], capsys)
    assert code == 0 and sorted(derivations) == expected and "0 files written" in err
    assert {k: v for k, v in _files(out).items() if k != fingerprint.MANIFEST_NAME} == {
        k: v for k, v in files.items() if k != fingerprint.MANIFEST_NAME
    }
    assert (out / fingerprint.MANIFEST_NAME).read_bytes() != manifest
    derivations.clear()
    code, out_, err = _run([*FEW, "--target", "numpy", "--out", str(out), "--check"], capsys)
    assert code == 0 and "came out identical" not in err  # the manifest is up to date again


def test_a_changed_input_that_changes_output_is_stale(tmp_path, capsys, monkeypatch, derivations):
    out = tmp_path / "gen"
    extra = _fake_source(tmp_path, monkeypatch, "# version 1\n")
    assert _run([*FEW, "--target", "numpy", "--out", str(out)], capsys)[0] == 0
    # An edit to the sources that changes what is generated (here: the banner's command).
    extra.write_text("# version 2\n")
    os.utime(extra, ns=(1_000_000_000, 1_000_000_000))
    monkeypatch.setattr(generate, "command_for", lambda op, target: f"make {op}")
    derivations.clear()
    code, out_, err = _run([*FEW, "--target", "numpy", "--out", str(out), "--check"], capsys)
    assert code == 1
    assert sorted(derivations) == sorted(FEW)
    assert all(f"stale: {_rel_to(out / 'numpy' / (n + '.py'))}" in out_ for n in FEW)
    assert _run([*FEW, "--target", "numpy", "--out", str(out)], capsys)[0] == 0
    assert "# Regenerate with: make relu\n" in (out / "numpy" / "relu.py").read_text()
    derivations.clear()
    assert _run([*FEW, "--target", "numpy", "--out", str(out), "--check"], capsys)[0] == 0


def _rel_to(path: Path) -> str:
    return generate._rel(path)


def test_check_catches_hand_edits_missing_and_orphaned_files_despite_the_manifest(tmp_path, capsys, derivations):
    assert _run([*FEW, "--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    (tmp_path / "numpy" / "relu.py").write_text((tmp_path / "numpy" / "relu.py").read_text().replace("np.maximum", "np.minimum") + "\n")
    (tmp_path / "numpy" / "softmax.py").unlink()
    (tmp_path / "numpy" / "__init__.py").write_text("# hand edit\n")
    derivations.clear()
    code, out, err = _run([*FEW, "--target", "numpy", "--out", str(tmp_path), "--check"], capsys)
    assert code == 1
    assert sorted(derivations) == sorted(FEW)  # --check renders every module, vouched for or not
    assert "stale:" in out and "numpy/relu.py" in out and "numpy/__init__.py" in out
    assert "missing:" in out and "softmax.py" in out and "conv2d" not in out
    # An orphan: a module of no registered op (only looked for when generating the whole registry).
    (tmp_path / "numpy" / "retired_op.py").write_text("")
    assert generate.orphans(tmp_path, FEW, ["numpy"]) == [tmp_path / "numpy" / "retired_op.py"]


def test_whole_registry_run_prunes_the_manifest_and_keeps_skipped_targets(tmp_path, capsys, monkeypatch, frozen_sources):
    monkeypatch.setattr(generate, "resolve_ops", lambda names: list(names) or ["relu", "softmax"])
    assert _run(["--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    path = tmp_path / fingerprint.MANIFEST_NAME
    data = json.loads(path.read_text())
    fake = {"fingerprint": "0" * 64, "sha256": "0" * 64}
    data["files"].update({"numpy/retired_op.py": fake, "triton/relu.py": fake, "gone_target/relu.py": fake})
    path.write_text(json.dumps(data))
    code, out, err = _run(["relu", "--target", "numpy", "--out", str(tmp_path)], capsys)  # a partial run keeps all
    assert code == 0 and {"numpy/retired_op.py", "triton/relu.py", "gone_target/relu.py"} <= set(json.loads(path.read_text())["files"])
    assert _run(["--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    files = json.loads(path.read_text())["files"]
    assert "triton/relu.py" in files  # the target not generated this time keeps its entries
    assert "numpy/retired_op.py" not in files and "gone_target/relu.py" not in files
    assert path.read_text() == fingerprint.manifest_text(files, fingerprint.Inputs().describe())


def test_sources_changing_during_a_run_are_not_recorded(tmp_path, capsys, monkeypatch, derivations):
    with monkeypatch.context() as m:  # a source edited after the process imported it
        m.setattr(fingerprint.Inputs, "changed", lambda self: ["symgrad/derive.py"])
        code, out, err = _run(["relu", "--target", "numpy", "--out", str(tmp_path)], capsys)
    assert code == 0 and "symgrad/derive.py changed while generating" in err
    assert (tmp_path / "numpy" / "relu.py").exists()  # written, as always
    assert json.loads((tmp_path / fingerprint.MANIFEST_NAME).read_text())["files"] == {}
    derivations.clear()
    assert _run(["relu", "--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    assert derivations == ["relu"]  # derived again, now recorded
    assert "numpy/relu.py" in json.loads((tmp_path / fingerprint.MANIFEST_NAME).read_text())["files"]


def test_an_unreadable_manifest_means_deriving_everything(tmp_path, capsys, derivations):
    assert _run(["relu", "--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    (tmp_path / fingerprint.MANIFEST_NAME).write_text("{ not json")
    derivations.clear()
    code, out, err = _run(["relu", "--target", "numpy", "--out", str(tmp_path), "--check"], capsys)
    assert code == 0 and derivations == ["relu"] and "is unreadable" in err
    assert _run(["relu", "--target", "numpy", "--out", str(tmp_path)], capsys)[0] == 0
    assert json.loads((tmp_path / fingerprint.MANIFEST_NAME).read_text())["format"] == 1


def test_user_op_fingerprint_covers_its_module_and_declaration(tmp_path, monkeypatch, capsys, derivations):
    """An op declared outside the package: its declaration and its module's source are inputs."""
    module = tmp_path / "my_user_ops.py"
    source = (
        "import sympy as sp\n"
        "from symgrad.declare import Op, Tensor, idx, output, register\n"
        "from symgrad.ops.dims import B\n"
        "(b,) = idx('b')\n"
        "x = Tensor('x', (B,))\n"
        "OP = register(Op(name='my_cube', doc='x cubed', inputs=(x,), outputs=(output('y', (b,), x[b] ** {power}, (B,)),)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(REGISTRY, "_ops", dict(REGISTRY._ops))  # registering leaves the library's registry alone

    def load(power: int, comment: str = ""):
        REGISTRY._ops.pop("my_cube", None)
        sys.modules.pop("my_user_ops", None)
        module.write_text(source.format(power=power) + comment)
        importlib.invalidate_caches()
        try:
            op = importlib.import_module("my_user_ops").OP
            inputs = fingerprint.Inputs()
            return inputs.fingerprint("numpy", op), inputs.fingerprint("numpy", REGISTRY.get("relu"))
        finally:
            sys.modules.pop("my_user_ops", None)

    cube, relu = load(3)
    assert load(3) == (cube, relu)  # deterministic
    cube_comment, relu2 = load(3, "# a comment\n")
    assert cube_comment != cube and relu2 == relu  # the module's bytes are an input of its ops only
    assert load(4)[0] not in (cube, cube_comment)  # and so is the expression (sympy.srepr)

    # Declared by code whose source cannot be read: never fingerprinted, so always derived.
    REGISTRY._ops.pop("my_cube", None)
    op = REGISTRY.add(dataclasses.replace(REGISTRY.get("relu"), name="my_cube", module="__no_such_module__"))
    assert fingerprint.Inputs().fingerprint("numpy", op) is None
    out = tmp_path / "gen"
    for _ in range(2):
        derivations.clear()
        assert _run(["my_cube", "--target", "numpy", "--out", str(out)], capsys)[0] == 0
        assert derivations == ["my_cube"]
        assert "numpy/my_cube.py" not in json.loads((out / fingerprint.MANIFEST_NAME).read_text())["files"]
