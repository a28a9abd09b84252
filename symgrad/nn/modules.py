"""``torch.nn`` modules whose forward runs symgrad's generated Triton kernels.

Each subclasses its ``torch.nn`` namesake and overrides only ``forward``: construction, defaults,
parameters, buffers, ``state_dict`` keys, ``reset_parameters`` and ``repr`` are torch's own, so a
torch checkpoint loads unchanged and ``isinstance(m, torch.nn.Linear)`` still holds. A
configuration the kernels cannot serve is refused when the module is built (``Unsupported``, naming
the option); :func:`symgrad.nn.patch` asks the same question (``unsupported``) before swapping.
"""
from __future__ import annotations

import torch

from . import functional as F
from ._kernels import Unsupported

__all__ = [
    "Linear", "Conv2d", "GELU", "SiLU", "Softmax", "LogSoftmax", "LayerNorm", "RMSNorm", "SwiGLU",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "MSELoss",
]


def _why(resolve, *options) -> str | None:
    """None when ``resolve`` (functional's choice of generated op) serves ``options``, else why not."""
    try:
        resolve(*options)
    except Unsupported as e:
        return str(e).split(": ", 1)[-1]
    return None


class _Symgrad:
    """What every symgrad module adds to its torch base: the support check, run at construction and
    by ``patch``, and the defaults of options torch's module lacks (``offset``, ``z_loss``...)."""

    _EXTRAS: dict = {}

    @classmethod
    def unsupported(cls, module: torch.nn.Module) -> str | None:
        """Why ``module``'s configuration cannot run on symgrad's kernels, or None if it can."""
        return None

    def _refuse_unsupported(self) -> None:
        why = type(self).unsupported(self)
        if why:
            raise Unsupported(f"symgrad.nn.{type(self).__name__}: {why}")

    @classmethod
    def from_torch(cls, module: torch.nn.Module) -> torch.nn.Module:
        """A symgrad module holding ``module``'s own Parameter and buffer objects (nothing copied),
        hooks and training mode; options torch lacks take their defaults."""
        new = cls.__new__(cls)
        new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
        for name, default in cls._EXTRAS.items():
            setattr(new, name, default)
        return new


class Linear(_Symgrad, torch.nn.Linear):
    """``torch.nn.Linear(in_features, out_features, bias=True)``: ``weight[out, in]``."""

    def forward(self, input):
        return F.linear(input, self.weight, self.bias)


def _conv_unsupported(m) -> str | None:
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} is not supported (only 'zeros')"
    try:
        if F._pair(m.dilation, "dilation") != 1:
            return f"dilation={m.dilation!r} is not supported (only 1)"
        if m.groups != 1:
            return f"groups={m.groups!r} is not supported (only 1)"
        F.conv_padding(m.padding, m.kernel_size, F._pair(m.stride, "stride"))
    except Unsupported as e:
        return str(e).split(": ", 1)[-1]
    return None


class Conv2d(_Symgrad, torch.nn.Conv2d):
    """``torch.nn.Conv2d(in, out, kernel_size, stride, padding, bias)``: one stride and one padding
    for both spatial axes, ``dilation=1``, ``groups=1``, ``padding_mode='zeros'``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_unsupported()

    @classmethod
    def unsupported(cls, module):
        return _conv_unsupported(module)

    def forward(self, input):
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GELU(_Symgrad, torch.nn.GELU):
    """``torch.nn.GELU(approximate='none' | 'tanh')``."""

    @classmethod
    def unsupported(cls, module):
        return None if module.approximate in ("none", "tanh") else f"approximate={module.approximate!r}"

    def forward(self, input):
        return F.gelu(input, approximate=self.approximate)


class SiLU(_Symgrad, torch.nn.SiLU):
    """``torch.nn.SiLU()`` (``inplace=True`` is refused: the kernels never write their input)."""

    def __init__(self, inplace: bool = False):
        super().__init__(inplace)
        self._refuse_unsupported()

    @classmethod
    def unsupported(cls, module):
        return "inplace=True is not supported (the kernels never write their input)" if module.inplace else None

    def forward(self, input):
        return F.silu(input)


class Softmax(_Symgrad, torch.nn.Softmax):
    """``torch.nn.Softmax(dim)`` along any axis."""

    def forward(self, input):
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(_Symgrad, torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax(dim)`` along any axis."""

    def forward(self, input):
        return F.log_softmax(input, self.dim, _stacklevel=5)


class LayerNorm(_Symgrad, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)``."""

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(_Symgrad, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True)`` plus ``offset``:
    the scale is ``weight + offset`` (Gemma's ``1 + w`` with ``offset=1.0``). The weight starts at
    ones as torch's does; a Gemma checkpoint brings its own."""

    _EXTRAS = {"offset": 0.0}

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, offset: float = 0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.offset = float(offset)
        self._refuse_unsupported()

    @classmethod
    def unsupported(cls, module):
        if getattr(module, "offset", 0.0) and module.weight is None:
            return "offset needs elementwise_affine=True (it scales by weight + offset)"
        return None

    def forward(self, input):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, offset=self.offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", offset={self.offset}" if self.offset else "")


class SwiGLU(torch.nn.Module):
    """The Llama feed-forward block: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, the gate in one
    kernel. Its ``state_dict`` keys are Llama's (``gate_proj.weight``, ``up_proj.weight``,
    ``down_proj.weight``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x):
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))


class CrossEntropyLoss(_Symgrad, torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss(weight, size_average, ignore_index, reduce, reduction,
    label_smoothing)`` plus ``z_loss`` (``z_loss * lse**2`` per counted row), ``softcap`` (logits
    capped at ``softcap * tanh(x / softcap)``) and ``return_z_loss`` (Liger's: ``forward`` returns
    ``(loss, z_loss term)``, the term without a gradient), keyword-only."""

    _EXTRAS = {"z_loss": 0.0, "softcap": None, "return_z_loss": False}

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None,
                 return_z_loss: bool = False):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss, self.softcap, self.return_z_loss = float(z_loss), softcap, bool(return_z_loss)
        self._refuse_unsupported()

    @classmethod
    def unsupported(cls, module):
        return _why(F._ce_op, module.reduction, module.weight, getattr(module, "z_loss", 0.0),
                    getattr(module, "softcap", None))

    def forward(self, input, target):
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                               return_z_loss=self.return_z_loss)


class BCEWithLogitsLoss(_Symgrad, torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss(weight=None, size_average=None, reduce=None, reduction='mean',
    pos_weight=None)``; ``weight`` and ``pos_weight`` are refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_unsupported()

    @classmethod
    def unsupported(cls, module):
        return _why(F._bce_op, module.reduction, module.weight, module.pos_weight)

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, reduction=self.reduction)


class MSELoss(_Symgrad, torch.nn.MSELoss):
    """``torch.nn.MSELoss(size_average=None, reduce=None, reduction='mean')``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_unsupported()

    @classmethod
    def unsupported(cls, module):
        return _why(F._mse_op, module.reduction, None)

    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)
