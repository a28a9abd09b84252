"""symgrad.nn against torch.nn / torch.nn.functional: every module and functional op over the cross
product of its options (sampled with a fixed seed where the product is large), odd sizes, leading
batch dims, float32 / float64 / bfloat16 and strided inputs; outputs and every gradient (inputs and
parameters) against torch's autograd. Runs on CPU through Triton's interpreter: sizes are tiny.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as TF

import symgrad.nn as snn
import symgrad.nn.functional as SF

# compiled on a CUDA GPU where there is one, else through the interpreter (conftest.py decides)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-10), torch.bfloat16: (3e-2, 3e-2)}


def sample(name: str, budget: int, **axes) -> list:
    """The cross product of ``axes`` as pytest params, sampled down to ``budget`` with a fixed
    seed; ``COUNTS`` records how many of how many are tested (the README reports them)."""
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    chosen = combos if len(combos) <= budget else random.Random(f"nn-{name}").sample(combos, budget)
    COUNTS[name] = (len(chosen), len(combos))
    return [pytest.param(c, id="-".join(_id(v) for v in c.values())) for c in chosen]


def _id(v) -> str:
    return str(v).replace("torch.", "").replace(" ", "")


COUNTS: dict[str, tuple[int, int]] = {}


def rand(shape, dtype, strided=False, seed=0, scale=1.0):
    """A random tensor; ``strided`` gives a non-contiguous view (every other entry of the last axis)."""
    g = torch.Generator().manual_seed(seed)
    if strided and len(shape):
        t = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)[..., ::2]
        assert not t.is_contiguous() or shape[-1] <= 1
    else:
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)
    return t


def compare(sg_fn, ref_fn, inputs: dict, dtype, cot_seed=7):
    """Run ``sg_fn`` and ``ref_fn`` on leaf copies of ``inputs`` (float tensors get gradients),
    backward with one random cotangent, and compare the outputs and every gradient. The reference
    runs in float32 on bfloat16 values, so bf16 is compared against the exact answer loosely."""
    def leaves(ref):
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                # detach keeps the case's layout (a strided view stays strided) on symgrad's side
                v = v.detach().float() if ref and v.dtype == torch.bfloat16 else v.detach()
                out[k] = v.requires_grad_(True)
            else:
                out[k] = v
        return out

    a, b = leaves(False), leaves(True)
    ya, yb = sg_fn(**a), ref_fn(**b)
    rtol, atol = TOL[dtype]
    assert ya.dtype == dtype and ya.shape == yb.shape, (ya.dtype, ya.shape, yb.shape)
    torch.testing.assert_close(ya.double(), yb.double(), rtol=rtol, atol=atol)
    cot = torch.randn(yb.shape, generator=torch.Generator().manual_seed(cot_seed), dtype=torch.float64)
    (ya * cot.to(ya.device, ya.dtype)).sum().backward()
    (yb * cot.to(yb.device, yb.dtype)).sum().backward()
    for k in a:
        if isinstance(a[k], torch.Tensor) and a[k].requires_grad:
            assert a[k].grad is not None, f"no gradient for {k}"
            torch.testing.assert_close(a[k].grad.double(), b[k].grad.double(), rtol=rtol, atol=atol,
                                       msg=lambda m: f"gradient of {k}: {m}")


# ---------------------------------------------------------------------------------------------
# activations


@pytest.mark.parametrize("c", sample("GELU", 8, approximate=("none", "tanh"), shape=((7,), (2, 3, 5)), dtype=DTYPES, strided=(False, True)))
def test_gelu(c):
    x = rand(c["shape"], c["dtype"], c["strided"], scale=2.0)
    run = lambda: compare(lambda x: snn.GELU(c["approximate"])(x), lambda x: TF.gelu(x, approximate=c["approximate"]), {"x": x}, c["dtype"])
    run()


@pytest.mark.parametrize("c", sample("SiLU", 6, shape=((7,), (2, 3, 5)), dtype=DTYPES, strided=(False, True)))
def test_silu(c):
    x = rand(c["shape"], c["dtype"], c["strided"], scale=2.0)
    run = lambda: compare(lambda x: snn.SiLU()(x), lambda x: TF.silu(x), {"x": x}, c["dtype"])
    run()


@pytest.mark.parametrize("c", sample("swiglu", 4, shape=((5,), (2, 3, 5)), dtype=DTYPES))
def test_swiglu(c):
    a, g = rand(c["shape"], c["dtype"], seed=1), rand(c["shape"], c["dtype"], seed=2)
    run = lambda: compare(SF.swiglu, lambda gate, up: TF.silu(gate) * up, {"gate": a, "up": g}, c["dtype"])
    run()


@pytest.mark.parametrize("c", sample("Softmax/LogSoftmax", 12, kind=("softmax", "log_softmax"), dim=(0, 1, -1),
                                     dtype=DTYPES, strided=(False, True)))
def test_softmax(c):
    x = rand((3, 4, 5), c["dtype"], c["strided"], scale=3.0)
    mod = (snn.Softmax if c["kind"] == "softmax" else snn.LogSoftmax)(dim=c["dim"])
    ref = getattr(TF, c["kind"])
    run = lambda: compare(lambda x: mod(x), lambda x: ref(x, dim=c["dim"]), {"x": x}, c["dtype"])
    run()


def test_softmax_implicit_dim_warns_as_torch():
    x = rand((2, 3), torch.float32)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        y = SF.softmax(x)
    torch.testing.assert_close(y, TF.softmax(x, dim=1))


# ---------------------------------------------------------------------------------------------
# contractions


@pytest.mark.parametrize("c", sample("Linear", 12, bias=(True, False), lead=((), (3,), (2, 3)), dtype=DTYPES,
                                     strided=(False, True)))
def test_linear(c):
    torch.manual_seed(0)
    ref = torch.nn.Linear(5, 4, bias=c["bias"]).to(DEVICE, c["dtype"])
    mod = snn.Linear(5, 4, bias=c["bias"]).to(DEVICE, c["dtype"])
    mod.load_state_dict(ref.state_dict())
    x = rand(c["lead"] + (5,), c["dtype"], c["strided"])
    params = {"weight": ref.weight.detach(), "bias": None if ref.bias is None else ref.bias.detach()}

    def sg(x, weight, bias):
        return SF.linear(x, weight, bias)

    run = lambda: compare(sg, lambda x, weight, bias: TF.linear(x, weight, bias), {"x": x, **params}, c["dtype"])
    run()
    # the module gives the functional's result
    torch.testing.assert_close(mod(x), SF.linear(x, ref.weight, ref.bias))


@pytest.mark.parametrize("c", sample("Conv2d", 10, bias=(True, False), stride=(1, 2), padding=(0, 1, "same"),
                                     unbatched=(False, True), dtype=(torch.float32, torch.float64)))
def test_conv2d(c):
    if c["padding"] == "same" and c["stride"] != 1:
        with pytest.raises(ValueError, match="strided"):
            snn.Conv2d(2, 3, 3, stride=c["stride"], padding="same")
        return
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(2, 3, 3, stride=c["stride"], padding=c["padding"], bias=c["bias"]).to(DEVICE, c["dtype"])
    mod = snn.Conv2d(2, 3, 3, stride=c["stride"], padding=c["padding"], bias=c["bias"]).to(DEVICE, c["dtype"])
    mod.load_state_dict(ref.state_dict())
    x = rand((2, 5, 6) if c["unbatched"] else (2, 2, 5, 6), c["dtype"])
    p = {"weight": ref.weight.detach(), "bias": None if ref.bias is None else ref.bias.detach()}
    kw = dict(stride=c["stride"], padding=c["padding"])
    run = lambda: compare(lambda x, weight, bias: SF.conv2d(x, weight, bias, **kw),
                          lambda x, weight, bias: TF.conv2d(x, weight, bias, **kw), {"x": x, **p}, c["dtype"])
    run()
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# normalization


@pytest.mark.parametrize("c", sample("LayerNorm", 10, affine=(True, False), bias=(True, False), shape=((5,), (3, 5)),
                                     lead=((4,), (2, 3)), dtype=DTYPES))
def test_layer_norm(c):
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(c["shape"], eps=1e-5, elementwise_affine=c["affine"], bias=c["bias"]).to(DEVICE, c["dtype"])
    with torch.no_grad():  # not torch's init of ones and zeros, so a swapped weight and bias would show
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    mod = snn.LayerNorm(c["shape"], eps=1e-5, elementwise_affine=c["affine"], bias=c["bias"]).to(DEVICE, c["dtype"])
    mod.load_state_dict(ref.state_dict())
    x = rand(c["lead"] + c["shape"], c["dtype"], scale=2.0)
    p = {"weight": None if ref.weight is None else ref.weight.detach(),
         "bias": None if ref.bias is None else ref.bias.detach()}
    run = lambda: compare(lambda x, weight, bias: SF.layer_norm(x, c["shape"], weight, bias, 1e-5),
                          lambda x, weight, bias: TF.layer_norm(x, c["shape"], weight, bias, 1e-5), {"x": x, **p}, c["dtype"])
    run()
    torch.testing.assert_close(mod(x).double(), ref(x).double(), rtol=TOL[c["dtype"]][0], atol=TOL[c["dtype"]][1])


def _rms_ref(x, weight, shape, eps, offset):
    dims = tuple(range(-len(shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps))
    return y if weight is None else y * (weight + offset)


@pytest.mark.parametrize("c", sample("RMSNorm", 10, affine=(True, False), offset=(0.0, 1.0), eps=(None, 1e-5),
                                     shape=((5,), (3, 5)), dtype=DTYPES))
def test_rms_norm(c):
    if c["offset"] and not c["affine"]:
        with pytest.raises(snn.Unsupported, match="offset"):
            snn.RMSNorm(c["shape"], eps=c["eps"], elementwise_affine=False, offset=c["offset"])
        return
    torch.manual_seed(0)
    ref = torch.nn.RMSNorm(c["shape"], eps=c["eps"], elementwise_affine=c["affine"]).to(DEVICE, c["dtype"])
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.copy_(torch.randn_like(ref.weight))
    mod = snn.RMSNorm(c["shape"], eps=c["eps"], elementwise_affine=c["affine"], offset=c["offset"]).to(DEVICE, c["dtype"])
    mod.load_state_dict(ref.state_dict())
    x = rand((2,) + c["shape"], c["dtype"], scale=2.0)
    p = {"weight": None if ref.weight is None else ref.weight.detach()}
    sg = lambda x, weight: SF.rms_norm(x, c["shape"], weight, c["eps"], offset=c["offset"])
    # torch's RMSNorm where there is no offset; the same formula written out where there is one
    rf = ((lambda x, weight: TF.rms_norm(x, c["shape"], weight, c["eps"])) if not c["offset"]
          else (lambda x, weight: _rms_ref(x, weight, c["shape"], c["eps"], c["offset"])))
    run = lambda: compare(sg, rf, {"x": x, **p}, c["dtype"])
    run()
    torch.testing.assert_close(mod(x), sg(x, mod.weight))



# ---------------------------------------------------------------------------------------------
# outputs changed in place: allowed where torch allows it, torch's error where backward reads them


_INPLACE_OK = {
    # name: (symgrad op, torch op, input shape); none of them saves its output for backward
    "silu": (SF.silu, TF.silu, (2, 3, 5)),
    "gelu": (SF.gelu, TF.gelu, (3, 5)),
    "linear": (lambda x: SF.linear(x, *_LIN), lambda x: TF.linear(x, *_LIN), (2, 3, 5)),
    "layer_norm": (lambda x: SF.layer_norm(x, (5,), _LIN[1], -_LIN[1]), lambda x: TF.layer_norm(x, (5,), _LIN[1], -_LIN[1]), (3, 5)),
    "rms_norm": (lambda x: SF.rms_norm(x, (5,), _LIN[1]), lambda x: TF.rms_norm(x, (5,), _LIN[1]), (2, 3, 5)),
}
_LIN = (rand((5, 5), torch.float32, seed=11), rand((5,), torch.float32, seed=12))  # weight [out, in], bias


@pytest.mark.parametrize("name", sorted(_INPLACE_OK))
def test_output_changed_in_place_as_torch(name):
    """``y = F.silu(x); y.mul_(2)`` (and a following ``ReLU(inplace=True)``): the op's real output
    reaches autograd, so torch's in-place rules apply, with torch's gradient."""
    sg, ref, shape = _INPLACE_OK[name]

    def run(fn):
        x = rand(shape, torch.float32, seed=2).requires_grad_(True)
        y = fn(x)
        y.mul_(2).relu_()
        (y * torch.arange(y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)).sum().backward()
        return y.detach(), x.grad

    (ya, ga), (yb, gb) = run(sg), run(ref)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_relu_inplace_after_linear_trains_as_torch():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(inplace=True), torch.nn.Linear(6, 3)).to(DEVICE)
    mod = torch.nn.Sequential(snn.Linear(5, 6), torch.nn.ReLU(inplace=True), snn.Linear(6, 3)).to(DEVICE)
    mod.load_state_dict(ref.state_dict())
    x = rand((2, 4, 5), torch.float32)
    ref(x).square().sum().backward()
    mod(x).square().sum().backward()
    for (k, a), b in zip(mod.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("kind, dim, shape", [("softmax", -1, (3, 5)), ("log_softmax", 1, (2, 5, 3)), ("softmax", 0, (4,))])
def test_saved_output_changed_in_place_raises_as_torch(kind, dim, shape):
    """softmax and log_softmax save their output for backward, in torch as in symgrad: changing it
    in place makes backward raise torch's error (never a gradient at values forward never saw)."""
    for fn in (getattr(SF, kind), getattr(TF, kind)):
        x = rand(shape, torch.float32).requires_grad_(True)
        y = fn(x, dim=dim)
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_saved_input_changed_in_place_raises_as_torch():
    for fn in (SF.silu, TF.silu):
        x = rand((3, 5), torch.float32).requires_grad_(True)
        h = x * 1.0
        y = fn(h)
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()

# ---------------------------------------------------------------------------------------------
# losses

def _ce_ref(x, y, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """torch's cross_entropy, after softcapping the logits, plus z_loss * lse**2 per counted row,
    reduced as torch reduces the loss (mean: over counted rows, weighted by class as torch weights)."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = TF.cross_entropy(x, y, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if not z_loss:
        return loss
    valid = (y != ignore_index).to(x.dtype)
    z = z_loss * torch.logsumexp(x, 1) ** 2 * valid
    if reduction == "none":
        return loss + z
    return loss + (z.sum() if reduction == "sum" else z.sum() / valid.sum())


@pytest.mark.parametrize("c", sample("CrossEntropyLoss", 32, reduction=("mean", "sum", "none"), ignore_index=(-100, 2),
                                     label_smoothing=(0.0, 0.1), weight=(False, True), z_loss=(0.0, 1e-2),
                                     softcap=(None, 5.0), spatial=(False, True), dtype=DTYPES))
def test_cross_entropy(c):
    n, classes = 5, 7
    shape = (n, classes, 3) if c["spatial"] else (n, classes)
    x = rand(shape, c["dtype"], scale=3.0)
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, classes, (n, 3) if c["spatial"] else (n,), generator=g).to(DEVICE)
    y.view(-1)[1] = c["ignore_index"]  # one ignored row; with ignore_index=2 a valid label 2 may also be ignored
    w = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, c["dtype"]) if c["weight"] else None
    opts = dict(ignore_index=c["ignore_index"], reduction=c["reduction"], label_smoothing=c["label_smoothing"])
    extra = dict(z_loss=c["z_loss"], softcap=c["softcap"])
    mod = snn.CrossEntropyLoss(w, **opts, **extra)
    ref = torch.nn.CrossEntropyLoss(w, **opts)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    run = lambda: compare(lambda x: mod(x, y), lambda x: _ce_ref(x, y, None if w is None else w.to(x.dtype), c["ignore_index"], c["reduction"],
                                                                 c["label_smoothing"], c["z_loss"], c["softcap"]),
                          {"x": x}, c["dtype"])
    run()


@pytest.mark.parametrize("c", sample("CrossEntropyLoss(return_z_loss)", 6, reduction=("mean", "sum", "none"), weight=(False, True),
                                     softcap=(None, 5.0), spatial=(False, True), dtype=(torch.float32, torch.float64)))
def test_cross_entropy_return_z_loss(c):
    """Liger's return_z_loss: (loss, z) with z the z-loss term the loss includes, reduced as the loss
    (mean: over the counted rows, class weights or not), without a gradient; the loss is unchanged."""
    n, classes, zl = 5, 7, 0.05
    shape = (n, classes, 2) if c["spatial"] else (n, classes)
    x = rand(shape, c["dtype"], scale=3.0).requires_grad_(True)
    g = torch.Generator().manual_seed(8)
    y = torch.randint(0, classes, (n, 2) if c["spatial"] else (n,), generator=g).to(DEVICE)
    y.view(-1)[2] = -100
    w = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, c["dtype"]) if c["weight"] else None
    opts = dict(reduction=c["reduction"], label_smoothing=0.1, z_loss=zl, softcap=c["softcap"])
    loss, z = snn.CrossEntropyLoss(w, **opts, return_z_loss=True)(x, y)
    # the reference: torch's logsumexp of the (capped) logits, classes on axis 1
    xc = x.detach() if c["softcap"] is None else c["softcap"] * torch.tanh(x.detach() / c["softcap"])
    counted = y != -100
    rows = zl * torch.where(counted, torch.logsumexp(xc, 1) ** 2, 0.0)
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / counted.sum()}[c["reduction"]]
    rtol, atol = TOL[c["dtype"]]
    assert z.shape == loss.shape == want.shape and z.dtype == c["dtype"] and not z.requires_grad
    torch.testing.assert_close(z, want, rtol=rtol, atol=atol)
    # the loss is the same as without return_z_loss, and z is the part z_loss adds to it
    plain = SF.cross_entropy(x, y, w, **opts)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    no_z = SF.cross_entropy(x, y, w, **{**opts, "z_loss": 0.0})
    torch.testing.assert_close(loss - z, no_z, rtol=rtol, atol=atol)
    (ga,) = torch.autograd.grad(loss.sum(), x)
    (gb,) = torch.autograd.grad(plain.sum(), x)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on the mean's 0/0
def test_cross_entropy_return_z_loss_edges():
    x, y = rand((3, 4), torch.float32), torch.tensor([1, -100, 2], device=DEVICE)
    loss, z = SF.cross_entropy(x, y, return_z_loss=True)  # z_loss 0: a zero term, and no extra pass
    assert float(z) == 0.0 and torch.equal(loss, SF.cross_entropy(x, y))
    _, z = SF.cross_entropy(x, torch.full((3,), -100, device=DEVICE), z_loss=1e-4, return_z_loss=True)
    assert z.isnan()  # a mean over no counted rows, as the loss's own (torch's NaN)
    _, z = SF.cross_entropy(x[0], y[0], z_loss=1e-4, reduction="none", return_z_loss=True)  # unbatched
    torch.testing.assert_close(z, 1e-4 * torch.logsumexp(x[0], 0) ** 2)


@pytest.mark.parametrize("c", sample("BCEWithLogitsLoss", 6, reduction=("mean", "sum", "none"), shape=((7,), (2, 3, 5)),
                                     dtype=(torch.float32, torch.float64)))
def test_bce_with_logits(c):
    x = rand(c["shape"], c["dtype"], scale=3.0)
    t = torch.rand(c["shape"], generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE, c["dtype"])
    mod = snn.BCEWithLogitsLoss(reduction=c["reduction"])
    run = lambda: compare(lambda x: mod(x, t), lambda x: TF.binary_cross_entropy_with_logits(x, t, reduction=c["reduction"]),
                          {"x": x}, c["dtype"])
    run()


@pytest.mark.parametrize("c", sample("MSELoss", 6, reduction=("mean", "sum", "none"), shape=((7,), (2, 3, 5)),
                                     dtype=(torch.float32, torch.float64)))
def test_mse(c):
    x, t = rand(c["shape"], c["dtype"], seed=5), rand(c["shape"], c["dtype"], seed=6)
    mod = snn.MSELoss(reduction=c["reduction"])
    run = lambda: compare(lambda x: mod(x, t), lambda x: TF.mse_loss(x, t, reduction=c["reduction"]), {"x": x}, c["dtype"])
    run()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on the mean's 0/0, torch's NaN
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_cross_entropy_all_ignored_and_empty_as_torch(reduction):
    """Every row ignored: torch's loss (NaN for mean) and an all-zero gradient; an empty batch: torch's."""
    for n in (3, 0):
        x = rand((n, 5), torch.float32)
        y = torch.full((n,), -100, dtype=torch.long, device=DEVICE)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        la, lb = SF.cross_entropy(a, y, reduction=reduction), TF.cross_entropy(b, y, reduction=reduction)
        torch.testing.assert_close(la, lb, equal_nan=True)
        la.sum().backward()
        lb.sum().backward()
        assert torch.equal(a.grad, b.grad) and not a.grad.isnan().any()


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the label check is a device-side assert, fatal to the process")
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_cross_entropy_label_out_of_range_is_an_error(reduction):
    """torch raises `Target 9 is out of bounds`; symgrad never returns a loss for such a label."""
    x = rand((3, 8), torch.float32)
    with pytest.raises(ValueError, match="9 is out of bounds"):
        SF.cross_entropy(x, torch.tensor([1, 9, -100], device=DEVICE), reduction=reduction)
    with pytest.raises(ValueError, match="out of bounds"):  # -100 is no longer ignored
        snn.CrossEntropyLoss(ignore_index=0)(x, torch.tensor([1, 0, -100], device=DEVICE))


def test_loss_errors_name_the_problem():
    x = rand((4, 5), torch.float32)
    with pytest.raises(snn.Unsupported, match="float\\) targets"):
        SF.cross_entropy(x, torch.rand(4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="target of shape"):
        SF.cross_entropy(x, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="Target size"):
        SF.mse_loss(x, rand((4, 1), torch.float32))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        SF.mse_loss(x, x, reduction="avg")
    with pytest.raises(snn.Unsupported, match="pos_weight"):
        snn.BCEWithLogitsLoss(pos_weight=torch.ones(5))


# ---------------------------------------------------------------------------------------------
# state_dict round trips and patch


def _pairs():
    return [
        (lambda: torch.nn.Linear(5, 4), lambda: snn.Linear(5, 4)),
        (lambda: torch.nn.Linear(5, 4, bias=False), lambda: snn.Linear(5, 4, bias=False)),
        (lambda: torch.nn.Conv2d(2, 3, 3, padding=1), lambda: snn.Conv2d(2, 3, 3, padding=1)),
        (lambda: torch.nn.LayerNorm((3, 5)), lambda: snn.LayerNorm((3, 5))),
        (lambda: torch.nn.LayerNorm(5, bias=False), lambda: snn.LayerNorm(5, bias=False)),
        (lambda: torch.nn.LayerNorm(5, elementwise_affine=False), lambda: snn.LayerNorm(5, elementwise_affine=False)),
        (lambda: torch.nn.RMSNorm(5), lambda: snn.RMSNorm(5, offset=1.0)),
    ]


@pytest.mark.parametrize("i", range(7))
def test_state_dict_round_trip(i):
    make_ref, make_sg = _pairs()[i]
    torch.manual_seed(0)
    ref = make_ref()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    sg = make_sg()
    assert list(sg.state_dict()) == list(ref.state_dict())
    sg.load_state_dict(ref.state_dict())  # strict, both ways
    back = make_ref()
    back.load_state_dict(sg.state_dict())
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_cross_entropy_weight_buffer_round_trip():
    ref = torch.nn.CrossEntropyLoss(torch.rand(5, device=DEVICE), label_smoothing=0.1)
    sg = snn.CrossEntropyLoss(torch.zeros(5, device=DEVICE), label_smoothing=0.1, z_loss=1e-3)
    assert list(sg.state_dict()) == list(ref.state_dict()) == ["weight"]
    sg.load_state_dict(ref.state_dict())
    assert torch.equal(sg.weight, ref.weight)
    x, y = rand((4, 5), torch.float32), torch.tensor([0, 4, 2, -100], device=DEVICE)
    sg.z_loss = 0.0
    torch.testing.assert_close(sg(x, y), ref(x, y))


class _MyLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_patch_swaps_in_place_sharing_parameters():
    torch.manual_seed(0)
    shared = torch.nn.Linear(6, 6)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.GELU(approximate="tanh"), shared, torch.nn.LayerNorm(6),
        torch.nn.Sequential(shared, torch.nn.Tanh(), torch.nn.SiLU(inplace=True)), _MyLinear(6, 6), torch.nn.LogSoftmax(dim=-1)).to(DEVICE)
    params = {n: p for n, p in model.named_parameters()}
    x = rand((3, 5), torch.float32)
    before = model(x.clone())
    report = snn.patch(model)
    assert set(report.swapped) == {"0", "1", "2", "3", "4.0", "6"}
    assert report.skipped == {"4.2": "inplace=True is not supported (the kernels never write their input)"}
    assert type(model[0]) is snn.Linear and type(model[5]) is _MyLinear  # a subclass keeps its own forward
    assert model[2] is model[4][0]  # a module shared by two parents stays one module
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    torch.testing.assert_close(model(x.clone()), before, rtol=1e-4, atol=1e-5)
    assert "skipped, inplace=True" in str(report)


def test_patch_a_torch_transformer_layer():
    """torch's own TransformerEncoderLayer, patched: its Linear and LayerNorm modules run symgrad's
    kernels (its attention calls F.multi_head_attention_forward, which patch cannot reach)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True,
                                             activation="gelu").to(DEVICE)
    ref = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True,
                                           activation="gelu").to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    report = snn.patch(layer)
    assert set(report.swapped) == {"linear1", "linear2", "norm1", "norm2"} and not report.skipped
    x = rand((2, 3, 8), torch.float32)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = layer(a), ref(b)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.linear1.weight.grad, ref.linear1.weight.grad, rtol=1e-4, atol=1e-5)


def test_patch_skips_unservable_configurations():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, dilation=2), torch.nn.Conv2d(1, 2, 3, groups=1, padding=(1, 2)),
                                torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), torch.nn.Conv2d(1, 2, 3))
    report = snn.patch(model)
    assert set(report.swapped) == {"3"}
    assert "dilation" in report.skipped["0"] and "padding" in report.skipped["1"] and "pos_weight" in report.skipped["2"]
    assert type(model[0]) is torch.nn.Conv2d


def test_unsupported_options_are_refused_at_construction():
    with pytest.raises(snn.Unsupported, match="groups"):
        snn.Conv2d(2, 2, 3, groups=2)
    with pytest.raises(snn.Unsupported, match="padding_mode"):
        snn.Conv2d(2, 2, 3, padding_mode="reflect")
    with pytest.raises(snn.Unsupported, match="inplace"):
        snn.SiLU(inplace=True)


def test_counts_cover_every_module():
    assert set(COUNTS) >= {"GELU", "SiLU", "swiglu", "Softmax/LogSoftmax", "Linear", "Conv2d", "LayerNorm", "RMSNorm",
                           "CrossEntropyLoss", "CrossEntropyLoss(return_z_loss)", "BCEWithLogitsLoss", "MSELoss"}


def test_cpu_without_interpreter_says_how(tmp_path):
    """triton imported before TRITON_INTERPRET=1: a CPU tensor is one clear error saying what to set."""
    import os
    import subprocess
    import sys

    code = ("import os, torch, triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'  # too late: triton is imported\n"
            "import symgrad.nn as nn\n"
            "try:\n    nn.Linear(3, 2)(torch.randn(4, 3))\n"
            "except RuntimeError as e:\n    print('ERROR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERROR symgrad.nn: input is a CPU tensor" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "triton was imported before it was" in out.stdout
