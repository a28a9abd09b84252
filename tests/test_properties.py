"""Property test: every library op, both targets, against torch on random inputs (issue 11).

Hypothesis draws, per op: sizes (odd ones, 1, and 0 about one time in ten where the declaration and
torch allow an empty dim), leading batch axes where the op's first dim is ``leading``, a dtype
(NumPy: float32, float64; Triton: float32, bfloat16 with loose tolerances), a layout per input
(contiguous, transposed, every other column of a wider buffer) and special values planted in the
float inputs (+-inf, NaN, +-1e30, 0, denormals). The reference is ``tests/torch_reference.py`` run
by torch in the same dtype (bfloat16 inputs: torch in float32 on the same rounded values). Where
torch's output or gradient is finite, ours must be close to it (relative to the tensor's largest
finite entry), or, where torch's own rounding departs from the exact value, close to torch in
float64 within what torch's answer moves under a few-ulp perturbation of the inputs; where torch's
forward output is NaN or +-inf (and is in float64 too), ours must be the same there; where torch
raises, ours must raise a clear error.

Bounded for CI (the Triton interpreter is slow): ``NUMPY_EXAMPLES`` and ``TRITON_EXAMPLES`` cases
per op, of 29 x (50 + 15) = 1885 drawn (the count run is in the README), about 90 s on 2 busy
cores, no deadline, derandomized so a failure reproduces (hypothesis seeds from the test's source:
editing ``run`` draws other cases). What is not compared is each a documented deviation (README,
Special values): ``NARROWED`` (the interpreter's bfloat16 subnormals), ``TORCH_REFUSES_EMPTY``
and ``NAN_GRADIENT_BY_DESIGN``; conv2d's output where torch's own padding gave NaN is compared with
torch computing the padding as a zero that contributes nothing (``PADDING_NAN``).
"""
from __future__ import annotations

import functools
import importlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import symgrad.ops  # noqa: E402,F401  (registers the op library)
from symgrad.declare import REGISTRY, Role  # noqa: E402
from symgrad.evaluate import instantiate, param_values  # noqa: E402
from torch_reference import REFERENCES, conv2d_padding_skipped  # noqa: E402

NUMPY_EXAMPLES = 50
TRITON_EXAMPLES = 15
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
OPS = [op.name for op in REGISTRY.of_kind("op")]  # update rules against torch.optim: tests/test_optim.py
SPECIALS = ("inf", "-inf", "nan", "1e30", "-1e30", "0", "denormal")
TOL = {np.float64: 1e-7, np.float32: 2e-3, "bfloat16": 6e-2}
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


# Special values not planted, each a documented deviation (README, Special values) that is not
# symgrad's kernels: (op, target or None for both, dtype or None for all, values, why). Under the Triton interpreter only: its bfloat16 -> float32 conversion
# (triton/runtime/interpreter.py, _convert_float) normalizes a subnormal input as if float32 had a
# wider exponent range, then clamps the exponent to 0 and drops the leading bit, so 9.2e-41 reads
# as 0. Compiled for sm_90 the same load is ``cvt.f32.bf16`` (exact) and ``x > 0`` is
# ``setp.gt.bf16`` on the loaded bits, so relu and log see the subnormal, as torch on a GPU does.
NARROWED = ((
    (None, "triton", "bfloat16", {"denormal"}, "the Triton interpreter flushes bfloat16 subnormals when it converts them"),
) if INTERPRET else ()) + (
    # the clipping and schedule ops' own gradients (README: Training), which clipping never uses
    ("grad_norm2", None, None, {"1e30", "-1e30"},
     "torch's vector_norm of one entry is |g| (no square); of two or more it overflows to inf as ours does"),
    ("grad_norm2", None, None, {"0", "denormal"},
     "the norm's gradient g/norm is 0/0 = NaN where the norm is 0 (torch: 0); clipping never differentiates the norm"),
    ("grad_norm_inf", None, None, {"nan"},
     "a NaN makes the max-norm's gradient NaN along its row, where torch gives 0 (clipping never differentiates the norm)"),
    ("warmup_cosine", None, None, {"1e30", "-1e30"}, "cos of a step near 1e30 depends on how pi*(t - warmup)/cosine_steps is rounded"),
) + tuple(
    (name, None, None, {"inf", "-inf"}, "the max-shifted lse of a row whose max is +-inf is NaN (as the loss's own lse, and "
     "Liger's z_loss), where torch's logsumexp gives +-inf")
    for name in ("softmax_z_loss_none", "softmax_z_loss_softcap_none")
)


# Empty dims torch shapes its own way, documented in the README ("Empty batches"): conv2d's Cin
# (torch returns a (N, 0, Ho, Wo) output; ours the sum over no channels, zeros of shape
# (N, Cout, Ho, Wo)). conv2d's H and W are drawn empty: both refuse them unless N or Cin is 0.
TORCH_REFUSES_EMPTY = {"conv2d": ("Cin",)}

# conv2d's padding contributes nothing (README, Special values), as torch's input gradient has it;
# torch's own forward multiplies the padding's zeros by the filter on CPU (float64 always, float32
# on its im2col path: 0*inf = NaN), so where its Y is NaN it is compared with torch computing the
# padding as a zero that contributes nothing (tests/torch_reference.py, conv2d_padding_skipped).
PADDING_NAN = {"conv2d": ("Y", conv2d_padding_skipped)}


# Documented deviations (README, Special values): the gradient of relu, leaky_relu, clip_by_value and step_decay at a NaN input
# is NaN ("a NaN in is a NaN out"); torch gives dout or alpha*dout there. Checked as NaN instead.
NAN_GRADIENT_BY_DESIGN = {"relu", "leaky_relu", "clip_by_value", "step_decay"}


def _narrow(name: str, target: str, dtype, specials: list[str]) -> list[str]:
    """The special values this case may plant: all of them, less NARROWED's for this op/target/dtype."""
    skip = set()
    for op, tgt, dt, values, _why in NARROWED:
        if op in (None, name) and tgt in (None, target) and (dt is None or dt == dtype):
            skip |= values
    return [s for s in specials if s not in skip]


# ------------------------------------------------------------------------------------------------
# drawing a case


@st.composite
def cases(draw, name: str, target: str, dtypes):
    op = REGISTRY.get(name)
    sizes = {}
    for d in op.dims:
        if d.extent is not None:
            continue
        # empty dims (0) where the declaration allows them (Dim.min_size, or refuses them unless
        # another dim is empty: Dim.empty_with) and torch takes them (or refuses them as ours do)
        small = (0,) if (d.min_size == 0 or d.empty_with) and d.name not in TORCH_REFUSES_EMPTY.get(name, ()) else ()
        # (about one draw in ten, so most cases still carry values)
        sizes[d.name] = draw(st.sampled_from((*small, 1, 2, 3) + (1, 2, 3) * 3) if d.name in ("R", "S")
                             else st.sampled_from((*small,) + (1, 2, 3, 5, 7) * 2))
    pv = {}
    for p in op.params:
        if p.name == "stride":
            pv[p.name] = draw(st.integers(1, 2))
        elif p.name == "pad":
            pv[p.name] = draw(st.integers(0, 1))
        elif p.name == "ignore_index":
            pv[p.name] = draw(st.sampled_from((p.default, 0)))
    try:
        dims = instantiate(op, sizes, pv)
    except Exception:
        dims = None
    hypothesis.assume(dims is not None and all(v >= 0 for v in dims.values()))
    params = param_values(op, sizes, pv)
    bad = [p.name for p in op.params if p.name in BAD_PARAMS]
    if bad and draw(st.sampled_from((False,) * 5 + (True,))):  # sometimes a param outside its domain
        p = draw(st.sampled_from(bad))
        params[p] = draw(st.sampled_from(BAD_PARAMS[p]))
        params["_bad"] = True
    dtype = draw(st.sampled_from(dtypes))
    first = op.inputs[0].dims[0] if op.inputs[0].dims else None
    lead = ()
    if first is not None and first.leading and dims[first.name] > 1 and draw(st.booleans()):
        # B = lead axes x the rest: split the folded dim into leading batch axes
        b = dims[first.name]
        k = next((k for k in (2, 3, 5, 7) if b % k == 0), b)
        lead = (k, b // k)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n_special = draw(st.integers(0, 3))
    specials = _narrow(name, target, dtype, [draw(st.sampled_from(SPECIALS)) for _ in range(n_special)])
    inputs = []
    for t in op.inputs:
        shape = tuple(dims[d.name] for d in t.dims)
        if t.role is Role.LABEL:
            classes = dims[op.facts[0].dim.name] if op.facts else 2
            if classes:
                y = rng.integers(0, classes, size=shape)
                if "ignore_index" in params and y.size > 1:
                    y[0] = params["ignore_index"]
            else:  # no classes: every label ignored (torch: NaN mean), or one that names no class (both raise)
                y = np.full(shape, params.get("ignore_index", 0))
                if y.size and draw(st.booleans()):
                    y.flat[-1] = 0
            inputs.append(("label", y, "contiguous"))
            continue
        lo, hi = t.domain
        v = rng.uniform(lo, hi, size=shape)
        for s in specials:
            if s in NONFINITE and (name, t.name) in FINITE_INPUTS:
                continue
            if v.size:
                v.flat[rng.integers(0, v.size)] = _special(s, dtype)
        layout = draw(st.sampled_from(("contiguous", "transposed", "strided"))) if v.ndim >= 2 else "contiguous"
        inputs.append(("float", v, layout))
    nonfinite = any(k == "float" and not np.isfinite(v).all() for k, v, _ in inputs)
    return op, params, dtype, lead, inputs, seed, nonfinite


# Documented deviation (README, Special values): an inf or NaN class weight of cross-entropy makes
# every counted row's gradient NaN (the smoothing term eps/C*sum(weight) meets it, as 0*inf where
# eps = 0); torch skips that term without smoothing. Only finite specials are planted there.
NONFINITE = {"inf", "-inf", "nan"}
FINITE_INPUTS = {(n, "weight") for n in REGISTRY.names() if n.startswith("softmax_cross_entropy_weighted")}

# Param values outside their declared domain (issue 11, item 4). Where torch raises, ours must raise
# a clear error naming the op; where torch does not (layer_norm eps=-0.5), ours may refuse it too.
BAD_PARAMS = {"eps": (1.5, -0.5), "pad": (-1,), "stride": (0, -1)}


def _special(s, dtype):
    if s == "denormal":
        return 1e-310 if dtype is np.float64 else 1e-40
    return float(s)


def _layout(a, layout, like):
    """The same values as ``a`` (a numpy array or torch tensor), laid out as asked."""
    if layout == "transposed":
        return like(np.ascontiguousarray(np.swapaxes(a, -1, -2))).swapaxes(-1, -2) if isinstance(a, np.ndarray) \
            else a.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        if isinstance(a, np.ndarray):
            wide = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), dtype=a.dtype)
        else:
            wide = torch.zeros((*a.shape[:-1], 2 * a.shape[-1]), dtype=a.dtype, device=a.device)
        wide[..., ::2] = a
        return wide[..., ::2]
    return a


def _with_lead(a, lead, op_input_is_leading):
    return a.reshape(*lead, *a.shape[1:]) if lead and op_input_is_leading else a


# ------------------------------------------------------------------------------------------------
# torch, and comparing with it


def _torch_reference(op, params, values, cot_seed, ref_dtype, references=REFERENCES):
    """torch's outputs and gradients (float64 numpy arrays, None where no gradient), or the error."""
    ts = []
    for t, (kind, v, _) in zip(op.inputs, values):
        if kind == "label":
            ts.append(torch.tensor(v, dtype=torch.int64))
        else:
            ts.append(torch.tensor(v, dtype=ref_dtype, requires_grad=t.role is Role.DIFF))
    try:
        outs = references[op.name](*ts, **params)
        outs = outs if isinstance(outs, tuple) else (outs,)
        rng = np.random.default_rng(cot_seed)
        cots = [torch.tensor(rng.standard_normal(tuple(o.shape)), dtype=o.dtype) for o in outs]
        diff = [t for t in ts if t.requires_grad]
        grads = iter(torch.autograd.grad(outs, diff, cots, allow_unused=True))
    except (RuntimeError, ValueError, IndexError) as e:
        return e, None, None, None
    gs = [next(grads) if t.requires_grad else None for t in ts]
    as_np = lambda x: None if x is None else x.detach().double().numpy()  # noqa: E731
    return None, [as_np(o) for o in outs], [as_np(g) for g in gs], [c.double().numpy() for c in cots]


def _near(got, want, tol, spread=None):
    finite = np.isfinite(want)
    scale = max(1.0, float(np.max(np.abs(want[finite]), initial=0.0)))
    slack = 0.0 if spread is None else 2 * np.nan_to_num(spread.reshape(want.shape), nan=0.0, posinf=0.0)
    return finite & (np.abs(got - want) <= tol * (np.abs(want) + scale) + slack)


def _layer_norm_textbook(x, w=None, bias=None, *, eps):
    xc = x - x.mean(-1, keepdim=True)
    y = xc / torch.sqrt((xc * xc).mean(-1, keepdim=True) + eps)
    return y * (1 if w is None else w) + (0 if bias is None else bias)


# The float64 reference of the exact check, where torch's fused float64 kernel rounds away from the
# exact value: its layer_norm backward forms dx as rstd*dy + b*x + c, cancelling terms of size
# |x|*rstd, so on a row of equal +-1e30 values (variance 0, rstd = eps**-0.5) it returns 0 where
# the derivative is rstd*(dy - mean(dy)); torch's autograd of the textbook formula (the mean
# subtracted first) has it.
EXACT = {**REFERENCES,
         "layer_norm": lambda x, w, bias, eps: _layer_norm_textbook(x, w, bias, eps=eps),
         "layer_norm_nobias": lambda x, w, eps: _layer_norm_textbook(x, w, eps=eps),
         "layer_norm_noaffine": lambda x, eps: _layer_norm_textbook(x, eps=eps)}


def _exact(*args):
    """_exact_now(*args), deferred: _check computes it only where torch in the working dtype
    disagrees (four more torch runs per case otherwise)."""
    return functools.partial(_exact_now, *args)


def _exact_now(op, params, values, cot_seed, ulp, ref_dtype):
    """torch in float64 on ``values``, with the spread of each entry: how far torch's answer (in
    float64, and in ``ref_dtype``, whose rounding a cancellation amplifies) moves when the float
    inputs move by up to 8 ``ulp``: ``([(out, spread)], [(grad, spread)])``, or None if it raised."""
    rng = np.random.default_rng(cot_seed)
    moved = [(k, v * (1 + 8 * ulp * rng.uniform(-1, 1, np.shape(v))) if k == "float" else v, lay) for k, v, lay in values]
    refs = [_torch_reference(op, params, vs, cot_seed, dt, EXACT if dt == torch.float64 else REFERENCES)
            for dt in (torch.float64, ref_dtype) for vs in (values, moved)]
    if any(r[0] is not None for r in refs):
        return None
    (_, o64, g64, _), (_, o64m, g64m, _), (_, o, g, _), (_, om, gm, _) = refs

    def pair(a, b, c, d):
        if a is None:
            return None
        with np.errstate(invalid="ignore"):
            return a, np.fmax(np.abs(a - b), np.abs(c - d))
    return [pair(*t) for t in zip(o64, o64m, o, om)], [pair(*t) for t in zip(g64, g64m, g, gm)]


def _close(what, got, want, tol, forward, exact=None):
    """``exact``: (torch in float64 on the same values, how far that moves when the inputs move by a
    few ulps of the working dtype). Where torch rounds away from the exact value (layer_norm's
    gradient at 1e30 is float32 noise of 1e25 where the exact value is 0; a row of equal -1e30s has
    a float64 mean that is not -1e30), an entry that close to the exact value passes too."""
    got = np.asarray(got, dtype=np.float64).reshape(want.shape)
    finite = np.isfinite(want)
    ok = _near(got, want, tol, None if exact is None or exact[0] is None else exact[1])
    rounded = np.zeros(want.shape, dtype=bool)  # non-finite in torch's dtype only (its own overflow)
    if exact is not None and exact[0] is not None:
        near_exact = _near(got, exact[0].reshape(want.shape), tol, exact[1])
        ok |= near_exact
        rounded = ~finite & near_exact
        # torch's float32 CPU kernels can give NaN where the value is +-inf (vectorized gelu at inf:
        # x*erf(...) in its own erf); the same infinity as float64's passes
        exact0 = exact[0].reshape(want.shape)
        rounded |= np.isnan(want) & np.isinf(exact0) & (got == exact0)
    bad = finite & ~ok
    assert not bad.any(), f"{what}: differs from torch at {np.argwhere(bad)[:4].tolist()}: " \
                          f"got {got[bad][:4]}, torch {want[bad][:4]}"
    if forward:  # NaN and +-inf where torch has them (or the exact value where only torch's dtype has them)
        nan = np.isnan(want) & ~rounded
        assert np.array_equal(np.isnan(got) & ~finite & ~rounded, nan), f"{what}: NaN where torch has {want[~finite][:4]}, got {got[~finite][:4]}"
        inf = np.isinf(want) & ~rounded
        assert np.array_equal(got[inf], want[inf]), f"{what}: torch has {want[inf][:4]}, got {got[inf][:4]}"


def _check(op, values, ref, got_outs, got_grads, tol, label, nonfinite, exact=None, params=None):
    """Against torch in the working dtype; where that fails, again with the exact reference
    (``exact()``, see :func:`_exact_now`), which only lets more through."""
    try:
        _check_against(op, values, ref, got_outs, got_grads, tol, label, nonfinite, params=params)
    except AssertionError:
        if exact is None:
            raise
        _check_against(op, values, ref, got_outs, got_grads, tol, label, nonfinite, exact(), params=params)


def _check_against(op, values, ref, got_outs, got_grads, tol, label, nonfinite, exact=None, params=None):
    """Finite torch values: close. NaN/inf in torch's outputs must be ours too when the inputs held
    NaN or inf (propagation, which the issue demands); from finite inputs they are torch's own
    overflow (layer_norm's float32 x*rstd - mean*rstd at 1e30), where we may stay finite."""
    _, outs, grads, _ = ref
    x_outs, x_grads = exact if exact is not None else ([None] * len(outs), [None] * len(grads))
    for name, g, w, x in zip([o.name for o in op.outputs], got_outs, outs, x_outs):
        if op.name in PADDING_NAN and name == PADDING_NAN[op.name][0] and np.isnan(w).any():
            w = np.where(np.isnan(w), _padding_skipped(values, params, PADDING_NAN[op.name][1]).reshape(w.shape), w)
        _close(f"{label} {op.name} {name}", g, w, tol, nonfinite, x)
    for t, g, w, x, (_, v, _) in zip(op.inputs, got_grads, grads, x_grads, values):
        if w is None:
            continue
        if op.name in NAN_GRADIENT_BY_DESIGN:
            at_nan = np.isnan(np.asarray(v, dtype=np.float64)).reshape(w.shape)
            got = np.asarray(g, dtype=np.float64).reshape(w.shape)
            assert np.isnan(got[at_nan]).all(), f"{label} {op.name} d{t.name}: not NaN at a NaN input"
            w = np.where(at_nan, np.nan, w)
        _close(f"{label} {op.name} d{t.name}", g, w, tol, False, x)


def _padding_skipped(values, params, reference):
    """The output as torch computes it with the padding a zero that contributes nothing (float64)."""
    ts = [torch.tensor(np.asarray(v, dtype=np.float64)) if k == "float" else torch.tensor(v) for k, v, _ in values]
    with np.errstate(invalid="ignore"):
        return reference(*ts, **params).detach().numpy()


def _raise_check(op, ref, call, label):
    """torch raised: ours must raise too, before computing, a clear error that names the op."""
    with pytest.raises((ValueError, TypeError, RuntimeError)) as e:
        call()
    assert str(e.value).startswith(f"{op.name}:"), f"{label}: torch raised {ref[0]!r}; ours: {e.value!r}"


def _refused(op, call) -> bool:
    """A param outside its domain that torch accepts: ours refusing it (clearly) is fine too."""
    try:
        call()
    except ValueError as e:
        assert str(e).startswith(f"{op.name}: param "), repr(e)
        return True
    return False


# ------------------------------------------------------------------------------------------------
# NumPy


@pytest.mark.parametrize("name", OPS)
def test_numpy_agrees_with_torch(name):
    mod = importlib.import_module(f"generated.numpy.{name}")

    @settings(max_examples=NUMPY_EXAMPLES, **SETTINGS)
    @given(cases(name, "numpy", (np.float32, np.float64)))
    def run(case):
        op, params, dtype, lead, inputs, seed, nonfinite = case
        params = dict(params)
        bad_param = params.pop("_bad", False)
        values = [(k, v.astype(dtype) if k == "float" else v, lay) for k, v, lay in inputs]
        ref_dtype = torch.float64 if dtype is np.float64 else torch.float32
        ref = _torch_reference(op, params, values, seed + 1, ref_dtype)
        args = []
        for t, (kind, v, lay) in zip(op.inputs, values):
            a = _layout(v, lay, np.asarray) if kind == "float" else v
            args.append(_with_lead(a, lead, bool(t.dims) and t.dims[0].leading))
        if ref[0] is not None:
            _raise_check(op, ref, lambda: mod.forward(*args, **params), "numpy")
            return
        if bad_param and _refused(op, lambda: mod.forward(*args, **params)):
            return
        _, outs, grads, cots = ref
        cots = [c.astype(dtype) for c in cots]
        lead_cots = [_with_lead(c, lead, bool(o.dims) and o.dims[0].leading) for c, o in zip(cots, op.outputs)]
        got_outs = mod.forward(*args, **params)
        got_outs = got_outs if isinstance(got_outs, tuple) else (got_outs,)
        got_grads = mod.vjp(*args, *lead_cots, **params)
        exact = _exact(op, params, values, seed + 1, np.finfo(dtype).eps, ref_dtype)
        _check(op, values, ref, got_outs, got_grads, TOL[dtype], f"numpy {np.dtype(dtype).name} lead={lead}", nonfinite, exact, params)

    run()


# ------------------------------------------------------------------------------------------------
# Triton (interpreted on CPU in CI: few, tiny cases)


@pytest.mark.parametrize("name", OPS)
def test_triton_agrees_with_torch(name):
    pytest.importorskip("triton")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    mod = importlib.import_module(f"generated.triton.{name}")

    @settings(max_examples=TRITON_EXAMPLES, **SETTINGS)
    @given(cases(name, "triton", (np.float32, "bfloat16")))
    def run(case):
        op, params, dtype, lead, inputs, seed, nonfinite = case
        params = dict(params)
        bad_param = params.pop("_bad", False)
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        # the values as the kernel sees them (bfloat16: rounded), and torch in float32 on those
        tensors, values = [], []
        for t, (kind, v, lay) in zip(op.inputs, inputs):
            if kind == "label":
                a = torch.tensor(v, dtype=torch.int64, device=DEVICE)
                values.append((kind, v, lay))
            else:
                a = torch.tensor(v, dtype=torch.float32).to(tdtype)
                values.append((kind, a.float().numpy(), lay))
                a = _layout(a.to(DEVICE), lay, None)
            tensors.append(_with_lead(a, lead, bool(t.dims) and t.dims[0].leading))
        ref = _torch_reference(op, params, values, seed + 1, torch.float32)
        if ref[0] is not None:
            _raise_check(op, ref, lambda: mod.forward(*tensors, **params), "triton")
            return
        if bad_param and _refused(op, lambda: mod.forward(*tensors, **params)):
            return
        _, outs, grads, cots = ref
        lead_cots = [_with_lead(torch.tensor(c, dtype=tdtype, device=DEVICE), lead, bool(o.dims) and o.dims[0].leading)
                     for c, o in zip(cots, op.outputs)]
        got_outs, saved = mod.forward_with_saved(*tensors, **params)
        got_outs = got_outs if isinstance(got_outs, tuple) else (got_outs,)
        got_grads = mod.backward(saved, *lead_cots)
        as_np = lambda x: None if x is None else x.detach().float().cpu().numpy()  # noqa: E731
        exact = _exact(op, params, values, seed + 1, 2.0**-8 if dtype == "bfloat16" else np.finfo(np.float32).eps, torch.float32)
        _check(op, values, ref, [as_np(o) for o in got_outs], [as_np(g) for g in got_grads],
               TOL[np.float32 if dtype != "bfloat16" else "bfloat16"], f"triton {getattr(dtype, '__name__', dtype)} lead={lead}", nonfinite, exact, params)

    run()

