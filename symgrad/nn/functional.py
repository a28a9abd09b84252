"""``torch.nn.functional``'s signatures over symgrad's generated Triton kernels.

Each function takes the arguments of its ``torch.nn.functional`` namesake, in torch's order and with
torch's defaults, accepts torch's shapes (any leading dims) and returns what torch returns. The
arithmetic runs in the generated modules (``generated.triton.<op>``); this layer only reshapes
(moves an axis last, folds trailing dims) and picks the op. An option or input the generated ops
cannot serve raises :class:`Unsupported` naming it, never a silently different result.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch.nn import _reduction as _torch_reduction

from ._kernels import Unsupported, check_device, kernel

__all__ = [
    "linear", "conv2d", "gelu", "silu", "swiglu", "softmax", "log_softmax", "layer_norm", "rms_norm",
    "cross_entropy", "binary_cross_entropy_with_logits", "mse_loss", "Unsupported",
]

_REDUCTIONS = ("mean", "sum", "none")


def _reduction(size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:  # torch's deprecated pair, read as torch reads it
        reduction = _torch_reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")  # torch's wording
    return reduction


def _devices(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            check_device(name, t)


# ---------------------------------------------------------------------------------------------
# contractions


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: ``input @ weight.T + bias`` with ``weight[out, in]``, ``input[*, in]``."""
    _devices(input=input, weight=weight, bias=bias)
    if weight.dim() != 2:
        raise Unsupported(f"symgrad.nn.functional.linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if bias is None:
        return kernel("linear_nobias", "linear without bias").apply(input, weight)
    return kernel("linear").apply(input, weight, bias)


def _pair(value, name: str) -> int:
    """One int for both spatial axes: symgrad's conv2d has one stride and one padding."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise Unsupported(f"symgrad.nn conv2d: {name}={tuple(value)!r} differs between height and width; "
                              f"symgrad's conv2d takes one {name} for both")
        value = value[0]
    return int(value)


def conv_padding(padding, kernel_size, stride: int) -> int:
    """torch's ``padding`` (an int, a pair, 'valid' or 'same') as symgrad's one symmetric pad."""
    if padding == "valid":
        return 0
    if padding == "same":
        k = _pair(kernel_size, "kernel_size")  # a non-square kernel is refused here
        if stride != 1:
            raise ValueError("padding='same' is not supported for strided convolutions")  # torch's wording
        if (k - 1) % 2:
            raise Unsupported(f"symgrad.nn conv2d: padding='same' with an even kernel ({k}) pads one side more; "
                              "symgrad's conv2d pads both sides alike")
        return (k - 1) // 2
    return _pair(padding, "padding")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d`` for ``dilation=1, groups=1``: ``input[N, Cin, H, W]`` (or unbatched ``[Cin, H, W]``)."""
    _devices(input=input, weight=weight, bias=bias)
    if _pair(dilation, "dilation") != 1:
        raise Unsupported(f"symgrad.nn conv2d: dilation={dilation!r} is not supported (only 1)")
    if groups != 1:
        raise Unsupported(f"symgrad.nn conv2d: groups={groups!r} is not supported (only 1)")
    s = _pair(stride, "stride")
    p = conv_padding(padding, tuple(weight.shape[-2:]) if weight.dim() == 4 else 1, s)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    y = kernel("conv2d").apply(x, weight, stride=s, pad=p)
    if bias is not None:
        # the channel axis last, where bias_add adds along rows; every other axis is a leading one
        y = kernel("bias_add").apply(y.movedim(1, -1), bias).movedim(-1, 1)
    return y.squeeze(0) if unbatched else y


# ---------------------------------------------------------------------------------------------
# activations


def _elementwise(op: str, x: torch.Tensor) -> torch.Tensor:
    check_device("input", x)
    if x.dim() == 0:  # the ops take [*, C]: a scalar is one entry
        return kernel(op).apply(x.reshape(1)).reshape(())
    return kernel(op).apply(x)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu``: exact (``approximate='none'``) or the tanh approximation (``'tanh'``)."""
    if approximate == "none":
        return _elementwise("gelu", input)
    if approximate == "tanh":
        return _elementwise("gelu_tanh", input)
    raise RuntimeError("approximate argument must be either none or tanh.")  # torch's wording


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.silu`` (``x * sigmoid(x)``); ``inplace=True`` is refused (symgrad never writes its inputs)."""
    if inplace:
        raise Unsupported("symgrad.nn silu: inplace=True is not supported (the kernels never write their input)")
    return _elementwise("silu", input)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one kernel, the gated unit of Llama-style MLPs."""
    _devices(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"symgrad.nn swiglu: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dim() == 0:
        return kernel("swiglu").apply(gate.reshape(1), up.reshape(1)).reshape(())
    return kernel("swiglu").apply(gate, up)


def _softmax_dim(name: str, ndim: int) -> int:
    # torch's implicit choice when dim is None (deprecated there too, with the same warning)
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. "
                  "Change the call to include dim=X as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


def _along(op: str, name: str, input: torch.Tensor, dim, dtype) -> torch.Tensor:
    check_device("input", input)
    if dtype is not None:
        input = input.to(dtype)
    if dim is None:
        dim = _softmax_dim(name, input.dim())
    if input.dim() == 0:
        return kernel(op).apply(input.reshape(1)).reshape(())
    dim = dim % input.dim() if -input.dim() <= dim < input.dim() else dim
    if not 0 <= dim < input.dim():
        raise IndexError(f"Dimension out of range (expected to be in range of [{-input.dim()}, {input.dim() - 1}], but got {dim})")
    # the ops reduce along the last axis, every axis before it a leading one
    return kernel(op).apply(input.movedim(dim, -1)).movedim(-1, dim)


def softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.softmax`` along any ``dim``."""
    return _along("softmax", "softmax", input, dim, dtype)


def log_softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.log_softmax`` along any ``dim``."""
    return _along("log_softmax", "log_softmax", input, dim, dtype)


# ---------------------------------------------------------------------------------------------
# normalization


def _normalized(input: torch.Tensor, normalized_shape, name: str) -> tuple[torch.Tensor, int]:
    """``input`` with the normalized trailing dims folded into one of size D, and D."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k:]) != shape:
        raise RuntimeError(f"{name}: Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size{list(input.shape)}")
    d = 1
    for s in shape:
        d *= s
    return input.reshape(*input.shape[: input.dim() - k], d), d


def _param(t: torch.Tensor | None, d: int, name: str):
    if t is None:
        return None
    if t.numel() != d:
        raise RuntimeError(f"{name} must have {d} entries (the normalized shape), got shape {tuple(t.shape)}")
    return t.reshape(d)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` over the trailing ``normalized_shape`` dims; ``weight``/``bias`` may be None."""
    _devices(input=input, weight=weight, bias=bias)
    x, d = _normalized(input, normalized_shape, "layer_norm")
    w, b = _param(weight, d, "weight"), _param(bias, d, "bias")
    if w is None and b is None:
        y = kernel("layer_norm_noaffine", "layer_norm without weight and bias").apply(x, eps=eps)
    elif b is None:
        y = kernel("layer_norm_nobias", "layer_norm without bias").apply(x, w, eps=eps)
    else:
        if w is None:  # a bias alone (F.layer_norm allows it): a weight of ones, xhat*1 is xhat exactly
            w = torch.ones(d, dtype=x.dtype, device=x.device)
        y = kernel("layer_norm").apply(x, w, b, eps=eps)
    return y.reshape(input.shape)


def rms_norm(input, normalized_shape, weight=None, eps: float | None = None, *, offset: float = 0.0) -> torch.Tensor:
    """``F.rms_norm`` over the trailing ``normalized_shape`` dims; ``eps=None`` is ``finfo(dtype).eps``
    as in torch. ``offset`` scales by ``weight + offset`` (Gemma's ``1 + w``), which torch lacks."""
    _devices(input=input, weight=weight)
    x, d = _normalized(input, normalized_shape, "rms_norm")
    w = _param(weight, d, "weight")
    if eps is None:
        eps = torch.finfo(input.dtype).eps if input.is_floating_point() else 1e-6
    if w is None:
        if offset:
            raise Unsupported("symgrad.nn rms_norm: offset needs a weight (it scales by weight + offset)")
        y = kernel("rms_norm_noaffine", "rms_norm without weight").apply(x, eps=eps)
    else:
        y = kernel("rms_norm").apply(x, w, eps=eps, offset=offset)
    return y.reshape(input.shape)


# ---------------------------------------------------------------------------------------------
# losses


def cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: float | None = None, return_z_loss: bool = False):
    """``F.cross_entropy`` over class indices: ``input[N, C]``, ``[C]`` or ``[N, C, d1, ...]`` with
    ``target[N]``, ``[]`` or ``[N, d1, ...]``. ``z_loss`` adds ``z_loss * lse**2`` per counted row and
    ``softcap`` caps the logits at ``softcap * tanh(x / softcap)`` first (neither is in torch).

    ``return_z_loss=True`` returns ``(loss, z)`` as Liger's ``return_z_loss`` does: ``z`` is the z-loss
    term ``loss`` already includes, reduced as ``loss`` is (per row for ``'none'``, summed for
    ``'sum'``, averaged over the counted rows for ``'mean'``, class weights or not), without a
    gradient (for logging: Liger's backward drops it too). It costs one more forward pass over the
    logits (the op ``softmax_z_loss[_softcap]_none``), none when ``z_loss`` is 0."""
    reduction = _reduction(size_average, reduce, reduction)
    _devices(input=input, target=target, weight=weight)
    if target.is_floating_point():
        raise Unsupported("symgrad.nn cross_entropy: class-probability (float) targets are not supported; "
                          "pass class indices")
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have a class axis, got a 0-d tensor")
    if input.dim() == 1:  # unbatched: [C] with a 0-d target
        x, y, out_shape = input.unsqueeze(0), target.reshape(1), ()
    else:
        c = input.shape[1]
        if tuple(target.shape) != (input.shape[0],) + tuple(input.shape[2:]):
            raise ValueError(f"cross_entropy: expected target of shape {(input.shape[0],) + tuple(input.shape[2:])} "
                             f"for input of shape {tuple(input.shape)}, got {tuple(target.shape)}")
        # classes last, every other axis a row: [N, C, d1, ...] -> [N*d1*..., C]
        x, y, out_shape = input.movedim(1, -1).reshape(-1, c), target.reshape(-1), tuple(target.shape)
    if softcap is not None and softcap < 0:
        raise ValueError(f"cross_entropy: softcap must be positive (or None/0 for off), got {softcap}")
    op = _ce_op(reduction, weight, z_loss, softcap)
    params = dict(eps=label_smoothing, ignore_index=ignore_index)
    if z_loss:
        params["z_loss"] = z_loss
    if softcap:
        params["softcap"] = softcap
    inputs = (x, y) if weight is None else (x, y, weight)
    loss = kernel(op).apply(*inputs, **params)
    loss = loss.reshape(out_shape) if reduction == "none" else loss
    if not return_z_loss:
        return loss
    return loss, _z_loss_value(x, y, reduction, ignore_index, z_loss, softcap).reshape(loss.shape)


def _z_loss_value(x, y, reduction: str, ignore_index: int, z_loss: float, softcap) -> torch.Tensor:
    """The z-loss term of cross_entropy's loss, reduced as the loss is, with no gradient."""
    if z_loss:
        op = "softmax_z_loss" + "_softcap" * bool(softcap) + "_none"
        params = dict(ignore_index=ignore_index, z_loss=z_loss, **({"softcap": softcap} if softcap else {}))
        module = kernel(op, "return_z_loss")
        # eager: the module's forward alone (no gradient buffer written); traced: its custom op
        rows = (module.apply(x, y, **params) if torch.compiler.is_compiling() else module.forward(x, y, **params)).detach()
    else:
        rows = torch.zeros(y.shape, dtype=x.dtype, device=x.device)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / (y != ignore_index).sum()


_SUFFIX = {"mean": "", "sum": "_sum", "none": "_none"}


def _ce_op(reduction: str, weight, z_loss: float, softcap) -> str:
    """The generated member of the cross-entropy family serving these options: class weights and
    softcapping are variants (``softmax_cross_entropy[_weighted][_softcap][_sum|_none]``), z_loss a
    param of each."""
    name = "softmax_cross_entropy" + "_weighted" * (weight is not None) + "_softcap" * bool(softcap) + _SUFFIX[reduction]
    wanted = ", ".join(o for o, on in ((f"reduction={reduction!r}", reduction != "mean"), ("weight", weight is not None),
                                       ("softcap", bool(softcap))) if on)
    module = kernel(name, f"cross_entropy with {wanted}" if wanted else "cross_entropy")
    if z_loss and "z_loss" not in module.PARAMS:
        raise Unsupported(f"symgrad.nn cross_entropy: z_loss is not a param of the generated op {name!r}")
    return name


def _same_shape(name: str, input, target) -> None:
    if input.shape != target.shape:
        raise ValueError(f"{name}: Target size ({tuple(target.shape)}) must be the same as input size ({tuple(input.shape)})")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Any shape as the [B, C] the elementwise losses take (the last axis as columns)."""
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction: str = "mean", pos_weight=None) -> torch.Tensor:
    """``F.binary_cross_entropy_with_logits`` (``weight`` and ``pos_weight`` not supported)."""
    reduction = _reduction(size_average, reduce, reduction)
    _devices(input=input, target=target)
    op = _bce_op(reduction, weight, pos_weight)
    _same_shape("binary_cross_entropy_with_logits", input, target)
    loss = kernel(op).apply(_rows(input), _rows(target))
    return loss.reshape(input.shape) if reduction == "none" else loss


def _bce_op(reduction: str, weight, pos_weight) -> str:
    """The generated op serving these options of binary_cross_entropy_with_logits."""
    for name, value in (("weight", weight), ("pos_weight", pos_weight)):
        if value is not None:
            raise Unsupported(f"symgrad.nn binary_cross_entropy_with_logits: {name} is not supported")
    name = "sigmoid_bce" + _SUFFIX[reduction]
    kernel(name, f"binary_cross_entropy_with_logits with reduction={reduction!r}")
    return name


def mse_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None) -> torch.Tensor:
    """``F.mse_loss`` for targets of the input's shape (torch would broadcast them, with a warning)."""
    reduction = _reduction(size_average, reduce, reduction)
    _devices(input=input, target=target)
    op = _mse_op(reduction, weight)
    _same_shape("mse_loss", input, target)
    loss = kernel(op).apply(_rows(input), _rows(target))
    return loss.reshape(input.shape) if reduction == "none" else loss


def _mse_op(reduction: str, weight) -> str:
    """The generated op serving these options of mse_loss (``mse`` is half the sum: not torch's)."""
    if weight is not None:
        raise Unsupported("symgrad.nn mse_loss: weight is not supported")
    name = "mse_" + reduction
    kernel(name, f"mse_loss with reduction={reduction!r}")
    return name
