"""Gradient clipping from generated code, with torch.nn.utils' contract.

The math is declared in ``symgrad/ops/clipping.py`` (``grad_norm2``, ``grad_norm_inf``,
``clip_by_norm``, ``clip_by_value``); this module is the host side: it walks the gradients, calls
the generated modules and writes the results back in place, as torch's ``clip_grad_norm_`` and
``clip_grad_value_`` do.

The global norm is a two-stage reduction, as torch computes it: the norm of each gradient (stage
one), then the norm of the vector of those norms (stage two, the same generated kernel), then one
map per gradient multiplies by ``min(1, max_norm/(total + 1e-6))`` read from the total-norm
tensor, so the scale never leaves the device (only ``error_if_nonfinite`` reads it back, as torch's
check does). Stage one and the scale are one launch per tensor: the plan's multi-tensor launch
serves update rules, and its emitters cannot take these yet (the Triton one expects the parameter
``p`` as the first input, the NumPy one prints no brackets, which ``min`` and the clamp are).

``clip_grad_norm_``/``clip_grad_value_`` take what torch's take (tensors with ``.grad``) and run
the Triton modules; ``clip_grad_norm_arrays``/``clip_grad_value_arrays`` take NumPy gradient
arrays and run the NumPy modules.
"""
from __future__ import annotations

import math

import numpy as np

from ..compose import load_module

_NORM_OPS = {2.0: "grad_norm2", math.inf: "grad_norm_inf"}


def _norm_type(norm_type) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number (2 or inf), got {norm_type!r}") from None
    if p not in _NORM_OPS:
        raise ValueError(f"norm_type {norm_type!r} is not supported: symgrad declares the 2-norm and the inf-norm "
                         "(norm_type=2.0 or float('inf'))")
    return p


def _check_max_norm(max_norm) -> float:
    v = float(max_norm)
    if not (0.0 <= v < math.inf):
        raise ValueError(f"max_norm must be a finite number >= 0, got {max_norm!r}")
    return v


class _Flat:
    """How one target views a gradient as the flat vector (or one row) the declarations take,
    stacks the per-tensor norms, and writes a result back into the caller's gradient."""

    def __init__(self, target: str):
        self.target = target

    def flat(self, g, p: float):
        return g.reshape(1, -1) if p == math.inf else g.reshape(-1)

    def stack(self, norms, p: float):
        if self.target == "numpy":
            v = np.stack([np.asarray(n).reshape(()) for n in norms])
        else:
            import torch

            v = torch.stack([n.reshape(()) for n in norms])
        return v.reshape(1, -1) if p == math.inf else v

    def scalar(self, norm):
        return norm.reshape(())

    def write(self, g, new):
        if self.target == "numpy":
            g[...] = new.reshape(g.shape)
        else:
            g.copy_(new.view(g.shape))

    def empty_norm(self):
        if self.target == "numpy":
            return np.array(0.0)
        import torch

        return torch.tensor(0.0)

    def nonfinite(self, total) -> bool:
        return not math.isfinite(float(total))  # a host sync, as torch's check is


def _total_norm(grads, p: float, flat: _Flat, error_if_nonfinite: bool):
    if not grads:
        return flat.empty_norm()
    norm = load_module(_NORM_OPS[p], flat.target)
    if p == math.inf:
        for i, g in enumerate(grads):
            if (g.size if flat.target == "numpy" else g.numel()) == 0:
                raise ValueError(f"gradient {i} is empty: its inf-norm (a max) is undefined, as torch refuses it")
    norms = [norm.forward(flat.flat(g, p)) for g in grads]  # stage one: each tensor's norm
    total = flat.scalar(norm.forward(flat.stack(norms, p)))  # stage two: the norm of the norms
    if error_if_nonfinite and flat.nonfinite(total):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    return total


def _clip_norm(grads, max_norm, norm_type, error_if_nonfinite, target):
    p, max_norm = _norm_type(norm_type), _check_max_norm(max_norm)
    flat = _Flat(target)
    total = _total_norm(grads, p, flat, error_if_nonfinite)
    scale = load_module("clip_by_norm", target)
    for g in grads:
        flat.write(g, scale.forward(g.reshape(-1), total, max_norm=max_norm))
    return total


def _clip_value(grads, clip_value, target):
    clamp = load_module("clip_by_value", target)
    v = float(clip_value)
    for g in grads:
        _Flat(target).write(g, clamp.forward(g.reshape(-1), clip_value=v))


def _torch_grads(parameters) -> list:
    import torch

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _arrays(grads) -> list:
    if isinstance(grads, np.ndarray):
        grads = [grads]
    grads = list(grads)
    for i, g in enumerate(grads):
        if not isinstance(g, np.ndarray):
            raise TypeError(f"gradient {i} is a {type(g).__name__}, not a NumPy array (clip_grad_norm_ takes torch tensors)")
        if not g.flags.writeable:
            raise ValueError(f"gradient {i} is read-only: clipping writes the gradients in place")
    return grads


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None):
    """Scale the ``.grad`` of ``parameters`` in place so their global ``norm_type``-norm is at most
    ``max_norm``; return the total norm (a 0-dim tensor on the gradients' device), as
    ``torch.nn.utils.clip_grad_norm_``. The generated Triton modules compute it. ``foreach`` is
    accepted for torch's signature and has no effect."""
    del foreach
    return _clip_norm(_torch_grads(parameters), max_norm, norm_type, error_if_nonfinite, "triton")


def clip_grad_value_(parameters, clip_value: float, foreach=None) -> None:
    """Clamp the ``.grad`` of ``parameters`` in place to ``[-clip_value, clip_value]``, as
    ``torch.nn.utils.clip_grad_value_``, with the generated Triton module."""
    del foreach
    _clip_value(_torch_grads(parameters), clip_value, "triton")


def clip_grad_norm_arrays(grads, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False):
    """``clip_grad_norm_`` for NumPy gradient arrays (modified in place) with the generated NumPy
    modules; returns the total norm as a 0-dim array."""
    return _clip_norm(_arrays(grads), max_norm, norm_type, error_if_nonfinite, "numpy")


def clip_grad_value_arrays(grads, clip_value: float) -> None:
    """``clip_grad_value_`` for NumPy gradient arrays (modified in place), generated NumPy module."""
    _clip_value(_arrays(grads), clip_value, "numpy")
