"""Changing a tensor between forward and backward is never silently wrong (issue 11, item 3).

NumPy: ``forward_with_saved`` hands out a saved dict of read-only arrays, copies wherever they would
share memory with an input passed or an output returned, so ``x += 1`` (or ``out *= 2``) before
``backward`` leaves the gradient that of the values forward saw. Triton: ``forward_with_saved``
records each saved tensor's version counter and ``backward`` raises as torch's autograd does; the
autograd path (``apply``) gets torch's own check through ``ctx.save_for_backward``.
Parametrized over the registry, at each op's smallest declared size.
"""
from __future__ import annotations

import importlib
import os
import re

import numpy as np
import pytest

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad.declare import REGISTRY, Role
from symgrad.evaluate import param_values, sample_inputs

OPS = [pytest.param(op.name, id=op.name) for op in REGISTRY.of_kind("op")]  # update rules save nothing
INPLACE = "modified by an inplace operation"


def _point(name, seed=0):
    op = REGISTRY.get(name)
    sizes = dict(op.test_sizes[0])
    inputs = sample_inputs(op, sizes, np.random.default_rng(seed), {})
    pv = param_values(op, sizes, {})
    return op, [inputs[t.name] for t in op.inputs], pv


def _tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _bump(a):
    """Change an array or tensor in place, as a training loop's update would."""
    floating = a.dtype.kind == "f" if isinstance(a, np.ndarray) else a.is_floating_point()
    a[...] = a * 0.5 + 1 if floating else 0


# ------------------------------------------------------------------------------------------------
# NumPy


def _np(name):
    return importlib.import_module(f"generated.numpy.{name}")


@pytest.mark.parametrize("name", OPS)
def test_numpy_inputs_and_outputs_changed_in_place_do_not_change_the_gradient(name):
    mod = _np(name)
    op, args, pv = _point(name)
    outs = _tuple(mod.forward(*args, **pv))
    rng = np.random.default_rng(1)
    cots = [rng.standard_normal(np.shape(o)) for o in outs]
    want = mod.vjp(*[a.copy() for a in args], *cots, **pv)

    args = [a.copy() for a in args]
    outs, saved = mod.forward_with_saved(*args, **pv)
    for v in saved.values():
        if isinstance(v, np.ndarray):
            assert not v.flags.writeable, "a saved array is writable"
    for a in (*args, *_tuple(outs)):  # every input and every output the caller holds
        if isinstance(a, np.ndarray) and a.flags.writeable:
            _bump(a)
    got = mod.backward(saved, *cots)
    for g, w, n in zip(got, want, op.inputs):
        if w is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=0, err_msg=f"{name}: d{n.name}", equal_nan=True)


def test_numpy_saved_dict_cannot_be_written():
    mod = _np("layer_norm")
    _, saved = mod.forward_with_saved(np.ones((2, 3)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="read-only"):
        saved["x"][0, 0] = 5.0


def test_numpy_vjp_and_forward_do_not_copy():
    """vjp owns its saved dict (nobody can change it between its forward and backward) and forward
    keeps none: neither pays for the copies."""
    import inspect

    mod = _np("layer_norm")
    assert "_forward_with_saved(" in inspect.getsource(mod.vjp)
    assert "_forward_with_saved(" in inspect.getsource(mod.forward)
    assert "own_saved" in inspect.getsource(mod.forward_with_saved)


def test_numpy_contract_says_so():
    import symgrad.targets as targets

    assert "in place" in targets.__doc__
    assert "in place" in _np("relu").forward_with_saved.__doc__


# ------------------------------------------------------------------------------------------------
# Triton (interpreted on CPU: tiny shapes)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _tr(name):
    return importlib.import_module(f"generated.triton.{name}")


def _torch_point(name):
    op, args, pv = _point(name)
    ts = [torch.tensor(a, dtype=torch.int64 if t.role is Role.LABEL else torch.float32, device=DEVICE)
          for t, a in zip(op.inputs, args)]
    return op, ts, pv


def _caller_tensor(mod, name, args, outs):
    if name in mod.INPUTS:
        return args[mod.INPUTS.index(name)]
    if name in mod.OUTPUTS:
        return _tuple(outs)[mod.OUTPUTS.index(name)]
    return None


def _visible(mod):
    """The saved tensors the caller holds (inputs and outputs), float or label."""
    return [n for n in mod.SAVED if n in mod.INPUTS or n in mod.OUTPUTS]


@pytest.mark.parametrize("name", OPS)
def test_triton_backward_raises_when_a_saved_tensor_changed_in_place(name):
    mod = _tr(name)
    visible = _visible(mod)
    if not visible:
        pytest.skip(f"{name} saves nothing the caller holds")
    op, args, pv = _torch_point(name)
    for saved_name in visible:
        outs, saved = mod.forward_with_saved(*args, **pv)
        cots = [torch.ones_like(o) for o in _tuple(outs)]
        _bump(_caller_tensor(mod, saved_name, args, outs))
        with pytest.raises(RuntimeError, match=rf"{name}: .*{INPLACE}: (input|output) {saved_name} .*expected version"):
            mod.backward(saved, *cots)
        op, args, pv = _torch_point(name)  # fresh inputs for the next name


@pytest.mark.parametrize("name", ["sigmoid", "layer_norm", "softmax_cross_entropy"])
def test_triton_vjp_and_unchanged_backward_pass(name):
    mod = _tr(name)
    op, args, pv = _torch_point(name)
    outs, saved = mod.forward_with_saved(*args, **pv)
    cots = [torch.ones_like(o) for o in _tuple(outs)]
    for g, w in zip(mod.backward(saved, *cots), mod.vjp(*args, *cots, **pv)):
        assert (g is None and w is None) or torch.equal(g, w)


@pytest.mark.parametrize("name", OPS)
def test_triton_autograd_path_gets_torchs_own_check(name):
    mod = _tr(name)
    visible = _visible(mod)
    if not visible:
        pytest.skip(f"{name} saves nothing the caller holds")
    saved_name = visible[0]
    op, args, pv = _torch_point(name)
    args = [a.requires_grad_() if t.role is Role.DIFF else a for t, a in zip(op.inputs, args)]
    outs = _tuple(mod.apply(*args, **pv))
    with torch.no_grad():
        _bump(_caller_tensor(mod, saved_name, args, outs))
    # torch says "modified by an inplace operation" (or, for an output that is a view made inside
    # the Function, refuses to use the view once it has been changed in place)
    with pytest.raises(RuntimeError, match=f"{INPLACE}|has been modified inplace"):
        sum(o.sum() for o in outs).backward()


@pytest.mark.parametrize("name, changed", [("layer_norm", "x"), ("softmax", "p"), ("relu", "x")])
def test_triton_inplace_error_shows_the_users_shape(name, changed):
    """The message names the tensor with the shape the user passed or got (leading axes kept), not
    the folded 2-D shape the kernels ran on."""
    mod = _tr(name)
    if changed not in mod.SAVED:
        pytest.skip(f"{name} does not save {changed}")
    op, args, pv = _torch_point(name)
    args[0] = torch.randn(2, 3, *args[0].shape[1:], device=DEVICE)  # leading axes (2, 3)
    outs, saved = mod.forward_with_saved(*args, **pv)
    _bump(_caller_tensor(mod, changed, args, outs))
    shape = list(_caller_tensor(mod, changed, args, outs).shape)
    assert len(shape) >= 3
    with pytest.raises(RuntimeError, match=re.escape(f"{changed} [float32 {shape}]")):
        mod.backward(saved, *[torch.ones_like(o) for o in _tuple(outs)])
