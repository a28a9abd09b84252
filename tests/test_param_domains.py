"""Issue 11, items 4, 5 and 9: params outside their declared domain, non-real inputs and empty
batches are never silently wrong, on both targets.

- every param of every op (the library's and the example project's) declares a domain, and the
  generated modules of both targets refuse a value outside it, at and beyond each end, with a
  ValueError naming the op, the param, the value and the domain, before computing anything;
- the NumPy modules refuse complex, boolean, integer, object and string inputs and cotangents, as
  the Triton modules do;
- an empty batch (any dim 0) gives torch's answer on both targets: empty outputs of the right
  shape, sums of nothing 0, means of nothing NaN, empty or zero gradients; where torch refuses an
  empty dim (a max over an empty row, a convolution's kernel or output channels), so do we.
"""
from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import symgrad.ops  # noqa: F401  (registers the library)
from symgrad.declare import REGISTRY, DeclarationError, Domain, Param, Role
from torch_reference import REFERENCES

OPS = [op.name for op in REGISTRY.of_kind("op")]  # update rules check their params in tests/test_optim*.py
PARAM_CASES = [(op.name, p.name) for op in REGISTRY.of_kind("op") for p in op.params]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def np_module(name):
    return importlib.import_module(f"generated.numpy.{name}")


def tr_module(name):
    return importlib.import_module(f"generated.triton.{name}")


def small_point(op, sizes=None, seed=0):
    """Inputs of ``op`` at its smallest test sizes (or ``sizes``), float32 NumPy arrays."""
    sizes = dict(sizes or op.test_sizes[0])
    rng = np.random.default_rng(seed)
    out = []
    for t in op.inputs:
        shape = tuple(sizes[d.name] for d in t.dims)
        if t.role is Role.LABEL:
            classes = next(d for d in op.dims if d.name == "C")
            out.append(rng.integers(0, max(sizes[classes.name], 1), size=shape))
        else:
            lo, hi = t.domain
            out.append(rng.uniform(lo, hi, size=shape).astype(np.float32))
    return out


def as_torch(args):
    return [torch.tensor(a) for a in args]


def outside(p: Param) -> list:
    """Values just beyond each end of the param's domain (and NaN, +-inf for a float param)."""
    d, step = p.domain, (1 if p.integer else 1e-3)
    vals = []
    if math.isfinite(d.low):
        vals.append(d.low - step if d.low_closed else d.low)
    if math.isfinite(d.high):
        vals.append(d.high + step if d.high_closed else d.high)
    if not p.integer:
        return vals + [math.nan, math.inf, -math.inf]
    return [int(v) for v in vals]


def at_edges(p: Param) -> list:
    """Values inside the domain at (or next to, for an open end) each of its ends."""
    d, step = p.domain, (1 if p.integer else 1e-3)
    vals = [p.default]
    if math.isfinite(d.low):
        vals.append(d.low if d.low_closed else d.low + step)
    if math.isfinite(d.high):
        vals.append(d.high if d.high_closed else d.high - step)
    return sorted({int(v) if p.integer else float(v) for v in vals})


# ------------------------------------------------------------------------------------------------
# item 4: param domains


DOMAINS = {  # the table the declarations must keep (README and `symgrad list` show it)
    ("leaky_relu", "alpha"): "finite",
    ("power", "k"): "finite",
    **{(ce, p): d for w in ("", "_weighted") for c in ("", "_softcap") for r in ("", "_sum", "_none")
       for ce in [f"softmax_cross_entropy{w}{c}{r}"]
       for p, d in {"eps": "in [0, 1]", "ignore_index": "an integer", "z_loss": "finite",
                    **({"softcap": "in (0, inf)"} if c else {})}.items()},
    **{(f"softmax_z_loss{c}_none", p): d for c in ("", "_softcap")
       for p, d in {"ignore_index": "an integer", "z_loss": "finite", **({"softcap": "in (0, inf)"} if c else {})}.items()},
    ("layer_norm", "eps"): "in (0, inf)",
    ("layer_norm_nobias", "eps"): "in (0, inf)",
    ("layer_norm_noaffine", "eps"): "in (0, inf)",
    ("rms_norm", "eps"): "in (0, inf)",
    ("rms_norm", "offset"): "finite",
    ("rms_norm_noaffine", "eps"): "in (0, inf)",
    ("conv2d", "stride"): "an integer >= 1",
    ("conv2d", "pad"): "an integer >= 0",
    # clipping and schedules (part B's symgrad/ops/clipping.py, schedules.py)
    ("clip_by_norm", "max_norm"): "in [0, inf)",
    ("clip_by_value", "clip_value"): "in [0, inf)",
    ("warmup_cosine", "lr"): "in [0, inf)",
    ("warmup_cosine", "warmup"): "an integer >= 1",
    ("warmup_cosine", "cosine_steps"): "an integer >= 1",
    ("warmup_cosine", "start_factor"): "in (0, 1]",
    ("warmup_cosine", "eta_min"): "finite",
    ("step_decay", "lr"): "in [0, inf)",
    ("step_decay", "step_size"): "an integer >= 1",
    ("step_decay", "gamma"): "in (0, inf)",
    ("step_decay", "warmup"): "an integer >= 0",
    ("step_decay", "start_factor"): "in (0, 1]",
    # update rules (symgrad/ops/optim.py): torch.optim's ranges
    ("sgd", "weight_decay"): "in [0, inf)",
    ("sgd", "l1"): "in [0, inf)",
    ("sgd_momentum", "momentum"): "in [0, inf)",
    ("sgd_momentum", "dampening"): "in [0, 1]",
    ("sgd_momentum", "weight_decay"): "in [0, inf)",
    ("nesterov", "momentum"): "in [0, inf)",
    ("nesterov", "dampening"): "in [0, 1]",
    ("nesterov", "weight_decay"): "in [0, inf)",
    ("rmsprop", "alpha"): "in [0, 1]",
    ("rmsprop", "eps"): "in [0, inf)",
    ("rmsprop", "weight_decay"): "in [0, inf)",
    ("rmsprop_momentum", "alpha"): "in [0, 1]",
    ("rmsprop_momentum", "eps"): "in [0, inf)",
    ("rmsprop_momentum", "momentum"): "in [0, inf)",
    ("rmsprop_momentum", "weight_decay"): "in [0, inf)",
    ("rmsprop_centered", "alpha"): "in [0, 1]",
    ("rmsprop_centered", "eps"): "in [0, inf)",
    ("rmsprop_centered", "weight_decay"): "in [0, inf)",
    ("rmsprop_centered_momentum", "alpha"): "in [0, 1]",
    ("rmsprop_centered_momentum", "eps"): "in [0, inf)",
    ("rmsprop_centered_momentum", "momentum"): "in [0, inf)",
    ("rmsprop_centered_momentum", "weight_decay"): "in [0, inf)",
    ("adam", "beta1"): "in [0, 1)",
    ("adam", "beta2"): "in [0, 1)",
    ("adam", "eps"): "in [0, inf)",
    ("adam", "weight_decay"): "in [0, inf)",
    ("adam_amsgrad", "beta1"): "in [0, 1)",
    ("adam_amsgrad", "beta2"): "in [0, 1)",
    ("adam_amsgrad", "eps"): "in [0, inf)",
    ("adam_amsgrad", "weight_decay"): "in [0, inf)",
    ("adamw", "beta1"): "in [0, 1)",
    ("adamw", "beta2"): "in [0, 1)",
    ("adamw", "eps"): "in [0, inf)",
    ("adamw", "weight_decay"): "in [0, inf)",
    ("adamw_amsgrad", "beta1"): "in [0, 1)",
    ("adamw_amsgrad", "beta2"): "in [0, 1)",
    ("adamw_amsgrad", "eps"): "in [0, inf)",
    ("adamw_amsgrad", "weight_decay"): "in [0, inf)",
    ("adagrad", "lr_decay"): "in [0, inf)",
    ("adagrad", "weight_decay"): "in [0, inf)",
    ("adagrad", "eps"): "in [0, inf)",
}


def test_every_param_declares_its_domain():
    got = {(op.name, p.name): p.domain.text(p.integer) for op in REGISTRY for p in op.params}
    assert got == DOMAINS


def test_domain_spellings_and_declaration_errors():
    assert Domain.parse("[0, 1]") == Domain(0.0, 1.0, True, True)
    assert Domain.parse("{0, 1}") == Domain(0.0, 1.0, True, True)
    assert Domain.parse("(0, inf)").text() == "in (0, inf)"
    assert Domain.parse("[1, inf)").text(integer=True) == "an integer >= 1"
    assert Domain.parse("finite").contains(1e308) and not Domain.parse("finite").contains(math.nan)
    with pytest.raises(DeclarationError, match="outside its domain"):
        Param("eps", -1.0, domain="(0, inf)")
    with pytest.raises(DeclarationError, match="empty"):
        Param("eps", 0.0, domain="[1, 0]")
    with pytest.raises(DeclarationError, match="write 'finite'"):
        Param("eps", 0.0, domain="positive")


@pytest.mark.parametrize("name, param", PARAM_CASES)
@pytest.mark.parametrize("target", ["numpy", "triton"])
def test_outside_the_domain_is_a_value_error(name, param, target):
    op = REGISTRY.get(name)
    p = next(q for q in op.params if q.name == param)
    args = small_point(op)
    mod = np_module(name) if target == "numpy" else tr_module(name)
    if target == "triton":
        args = as_torch(args)
    for value in outside(p):
        want = rf"^{name}: param {param} must be {p.domain.text(p.integer)}, got {value!r}$".replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")
        with pytest.raises(ValueError, match=want):
            mod.forward(*args, **{param: value})
        with pytest.raises(ValueError, match=want):
            mod.forward_with_saved(*args, **{param: value})
        if target == "triton":
            with pytest.raises(ValueError, match=want):
                mod.apply(*args, **{param: value})


@pytest.mark.parametrize("name, param", PARAM_CASES)
def test_at_the_edges_of_the_domain_numpy_agrees_with_torch(name, param):
    op = REGISTRY.get(name)
    p = next(q for q in op.params if q.name == param)
    sizes = dict(op.test_sizes[1 % len(op.test_sizes)])
    args = small_point(op, sizes, seed=1)
    for value in at_edges(p):
        pv = {q.name: q.default for q in op.params} | {param: value}
        got = np_module(name).forward(*args, **pv)
        t_args = [torch.from_numpy(a).double() if t.role is not Role.LABEL else torch.from_numpy(a)
                  for t, a in zip(op.inputs, args)]
        want = REFERENCES[name](*t_args, **pv)
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=f"{name} at {param}={value}")


@pytest.mark.parametrize("name, param", [("conv2d", "stride"), ("conv2d", "pad"), ("softmax_cross_entropy", "eps")])
def test_triton_at_the_closed_ends(name, param):
    op = REGISTRY.get(name)
    p = next(q for q in op.params if q.name == param)
    args = small_point(op, seed=2)
    for value in at_edges(p):
        pv = {q.name: q.default for q in op.params} | {param: value}
        got = tr_module(name).forward(*as_torch(args), **pv)
        want = np_module(name).forward(*args, **pv)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5, err_msg=f"{name} at {param}={value}")


def test_torch_refuses_what_we_refuse():
    """Where torch checks a param, our domain is torch's: the same values are refused."""
    import torch.nn.functional as F

    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(Exception, match="label_smoothing must be between 0.0 and 1.0"):
        F.cross_entropy(x, y, label_smoothing=1.5)
    # torch (2.x) lets eps = -0.5 through, a target weight above 1 and negative ones: we refuse it too
    F.cross_entropy(x, y, label_smoothing=1.0)
    X, W = torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 1, 1)
    with pytest.raises(Exception):
        F.conv2d(X, W, stride=0)
    with pytest.raises(Exception):
        F.conv2d(X, W, padding=-1)


def test_symgrad_list_shows_domains():
    from symgrad import render

    text = render.op_list_text([REGISTRY.get("conv2d"), REGISTRY.get("softmax_cross_entropy")])
    assert "stride=1 (an integer >= 1)" in text and "pad=0 (an integer >= 0)" in text
    assert "eps=0 (in [0, 1])" in text or "eps=0.0 (in [0, 1])" in text
    assert render.param_dict(REGISTRY.get("layer_norm").params[0])["domain"] == "in (0, inf)"


def test_generated_modules_carry_one_domain_table():
    """One table per module, read by the one runtime check; no hand-written per-op checks."""
    for target in ("numpy", "triton"):
        for op in REGISTRY:
            if not op.params:
                continue
            src = open(importlib.import_module(f"generated.{target}.{op.name}").__file__).read()
            assert src.count("_PARAM_DOMAINS = {") == 1 and "check_params(OP, " in src, (target, op.name)


# the example project's params


def test_user_ops_params():
    from test_user_ops import REGISTRY as USER

    huber = USER.get("huber")
    assert {p.name: p.domain.text(p.integer) for p in huber.params} == {"delta": "in (0, inf)"}
    attention = USER.get("attention")
    assert {p.name: p.domain.text(p.integer) for p in attention.params} == {"causal": "in {0, 1}"}


@pytest.mark.parametrize("target", ["numpy", "triton"])
def test_user_ops_refuse_params_outside_their_domain(target, tmp_path_factory):
    from test_user_ops import REGISTRY as USER, module

    for name, param, bad, good in (("huber", "delta", (0.0, -1.0, math.nan, math.inf), (1e-3, 2.0)),
                                   ("attention", "causal", (-1, 2), (0, 1))):
        op = USER.get(name)
        sizes = {d.name: 2 for d in op.dims}
        args = small_point(op, sizes)
        mod = module(name, target, tmp_path_factory)
        if target == "triton":
            args = as_torch(args)
        text = next(p for p in op.params if p.name == param).domain
        for value in bad:
            with pytest.raises(ValueError, match=rf"^{name}: param {param} must be .*, got {value!r}$"):
                mod.forward(*args, **{param: value})
        if target == "numpy":
            for value in good:
                mod.forward(*args, **{param: value})
        assert text.contains(good[0])


# ------------------------------------------------------------------------------------------------
# item 5: non-real inputs


NOT_REAL = {
    "complex": lambda a: a.astype(np.complex128) + 1j,
    "bool": lambda a: a > 0,
    "int": lambda a: a.astype(np.int64),
    "object": lambda a: a.astype(object),
    "str": lambda a: a.astype(str),
}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("kind", list(NOT_REAL))
def test_numpy_refuses_non_real_inputs(name, kind):
    op = REGISTRY.get(name)
    args = small_point(op)
    for k, t in enumerate(op.inputs):
        if t.role is Role.LABEL:
            continue
        bad = list(args)
        bad[k] = NOT_REAL[kind](args[k])
        with pytest.raises(ValueError, match=rf"^{name}: input {t.name} must be a real float array .*got dtype"):
            np_module(name).forward(*bad)


@pytest.mark.parametrize("name", ["relu", "softmax", "softmax_cross_entropy", "linear"])
def test_numpy_refuses_complex_cotangents(name):
    op = REGISTRY.get(name)
    mod = np_module(name)
    outs, saved = mod.forward_with_saved(*small_point(op))
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = [np.ones(np.shape(o)) + 1j for o in outs]
    with pytest.raises(ValueError, match=rf"^{name}: cotangent d\w+ must be a real float array"):
        mod.backward(saved, *cots)
    # a Python number is a float cotangent, and keeps float32 math in float32
    if all(np.shape(o) == () for o in outs):
        grads = mod.backward(saved, *[1 for _ in outs])
        assert all(g is None or g.dtype == np.float32 for g in grads)


@pytest.mark.parametrize("kind", ["complex", "bool", "int"])
def test_triton_refuses_the_same(kind):
    mod = tr_module("relu")
    x = torch.from_numpy(NOT_REAL[kind](np.ones((2, 3), np.float32)))
    with pytest.raises(ValueError, match="relu: input x must have dtype float32, float16, bfloat16 or float64"):
        mod.forward(x)


# ------------------------------------------------------------------------------------------------
# item 9: empty batches


def _given_dims(op):
    return [d.name for d in op.dims if d.extent is None]


EMPTY_CASES = [(op.name, d) for op in REGISTRY.of_kind("op") for d in _given_dims(op)]
TORCH_REFUSES = {("max", "C"), ("conv2d", "Cout"), ("conv2d", "R"), ("conv2d", "S"),
                 ("conv2d", "H"), ("conv2d", "W"),  # unless N or Cin is 0 too (test_conv2d_empty_height_as_torch)
                 ("grad_norm_inf", "N")}  # no max of an empty gradient
# no classes: with rows, a label that is not ignore_index names no class (torch: "Target 0 is out of
# bounds"); all rows ignored: tests/test_ce_options.py::test_no_classes
LABELS_OUT_OF_BOUNDS = {(op.name, "C") for op in REGISTRY if op.name.startswith(("softmax_cross_entropy", "softmax_z_loss"))}


def _torch_run(op, args, pv):
    ts = [torch.from_numpy(a).double().requires_grad_(t.role is Role.DIFF) if t.role is not Role.LABEL
          else torch.from_numpy(a) for t, a in zip(op.inputs, args)]
    out = REFERENCES[op.name](*ts, **pv)
    outs = out if isinstance(out, tuple) else (out,)
    cots = [torch.ones_like(o) for o in outs]
    diff = [t for t, d in zip(ts, op.inputs) if d.role is Role.DIFF]
    grads = torch.autograd.grad(outs, diff, cots, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, diff)]
    return [o.detach().numpy() for o in outs], [g.numpy() for g in grads], [c.numpy() for c in cots]


def _check(got, want, what):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch {want.shape}"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=what)


@pytest.mark.parametrize("name, dim", EMPTY_CASES)
@pytest.mark.parametrize("target", ["numpy", "triton"])
def test_empty_batches_follow_torch(name, dim, target):
    op = REGISTRY.get(name)
    sizes = dict(op.test_sizes[1 % len(op.test_sizes)])
    sizes[dim] = 0
    args = small_point(op, sizes, seed=3)
    pv = {p.name: p.default for p in op.params}
    mod = np_module(name) if target == "numpy" else tr_module(name)
    conv = (lambda a: a) if target == "numpy" else (lambda a: torch.tensor(a))
    if (name, dim) in TORCH_REFUSES:
        with pytest.raises(ValueError, match=rf"^{name}: dim \w+ .*is -?\d+"):
            mod.forward(*[conv(a) for a in args], **pv)
        return
    if (name, dim) in LABELS_OUT_OF_BOUNDS:
        with pytest.raises(ValueError, match=rf"^{name}: label y\[0\] = 0 is out of bounds: labels must lie in \[0, 0\)"):
            mod.forward(*[conv(a) for a in args], **pv)
        return
    if (name, dim) == ("conv2d", "Cin"):
        # torch returns a (N, 0, Ho, Wo) tensor here, against its own output shape (N, Cout, Ho, Wo):
        # we return the sum over no input channels, zeros of the declared shape
        y = mod.forward(*[conv(a) for a in args], **pv)
        assert tuple(y.shape) == (2, 2, 3, 4) and float(abs(y).sum()) == 0.0
        return
    want_outs, want_grads, cots = _torch_run(op, args, pv)
    outs, saved = mod.forward_with_saved(*[conv(a) for a in args], **pv)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for o, w, q in zip(outs, want_outs, op.outputs):
        _check(o, w, f"{name} {dim}=0 {target}: output {q.name}")
    grads = mod.backward(saved, *[conv(c.astype(np.float32)) for c in cots])
    want = iter(want_grads)
    for t, g in zip(op.inputs, grads):
        if t.role is Role.DIFF:
            _check(g, next(want), f"{name} {dim}=0 {target}: gradient of {t.name}")


@pytest.mark.parametrize("target", ["numpy", "triton"])
def test_conv2d_empty_height_as_torch(target):
    """An input of height or width 0: torch refuses it ("Only zero batch or zero channel inputs are
    supported") unless the batch or the channels are empty too (then an empty output); so do ours
    (Dim(empty_with=("N", "Cin"))). Ours read only padding there before, and gave zeros."""
    mod = np_module("conv2d") if target == "numpy" else tr_module("conv2d")
    conv = (lambda a: a) if target == "numpy" else (lambda a: torch.tensor(a))
    W = np.ones((2, 1, 1, 1), np.float32)
    for shape in ((1, 1, 0, 3), (2, 1, 3, 0)):
        with pytest.raises(RuntimeError, match="Only zero batch or zero channel inputs"):
            F.conv2d(torch.ones(shape), torch.tensor(W), padding=1)
        dim = "H" if shape[2] == 0 else "W"
        with pytest.raises(ValueError, match=rf"^conv2d: dim {dim} is 0; it must be at least 1 unless N or Cin is 0"):
            mod.forward(conv(np.ones(shape, np.float32)), conv(W), pad=1)
    X = np.ones((0, 1, 0, 3), np.float32)
    want = F.conv2d(torch.tensor(X), torch.tensor(W), padding=1)
    assert tuple(mod.forward(conv(X), conv(W), pad=1).shape) == tuple(want.shape) == (0, 2, 2, 5)


@pytest.mark.parametrize("name", ["relu", "sum", "mean", "softmax", "linear", "layer_norm", "softmax_cross_entropy", "mse_mean"])
def test_empty_batch_through_autograd(name):
    """The Triton modules' autograd path (custom ops) takes an empty batch too."""
    op = REGISTRY.get(name)
    sizes = dict(op.test_sizes[1 % len(op.test_sizes)])
    sizes["B"] = 0
    args = small_point(op, sizes, seed=4)
    ts = [torch.from_numpy(a).requires_grad_(t.role is Role.DIFF) for t, a in zip(op.inputs, args)]
    out = tr_module(name).apply(*ts)
    out.sum().backward()
    for t, x in zip(op.inputs, ts):
        if t.role is Role.DIFF:
            assert x.grad is not None and x.grad.shape == x.shape


def test_empty_leading_axes():
    """``[*, D]`` ops take empty leading axes, as torch does."""
    x = np.zeros((2, 0, 5), np.float32)
    w, b = np.ones(5, np.float32), np.zeros(5, np.float32)
    assert np_module("layer_norm").forward(x, w, b).shape == (2, 0, 5)
    assert tuple(tr_module("layer_norm").forward(*as_torch([x, w, b])).shape) == (2, 0, 5)
    assert np_module("sum").forward(np.zeros((3, 0), np.float32)).tolist() == [0.0, 0.0, 0.0]
