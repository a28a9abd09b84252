"""Gradient clipping from generated code, with torch.nn.utils' contract.

The math is declared in ``symgrad/ops/clipping.py`` (``grad_norm2``, ``grad_norm_inf``,
``clip_by_norm``, ``clip_by_value``); this module is the host side: it hands the gradients to the
generated modules' multi-tensor entries (``forward_multi``, :mod:`symgrad.plan_multi`) and lets
them write the results back in place, as torch's ``clip_grad_norm_`` and ``clip_grad_value_`` do.

What is launched (Triton; the NumPy modules run the same stages as chunked loops), whatever the
number of gradients:

1. stage one of the global norm: ONE multi-tensor launch per gradient dtype (torch's ``foreach``
   grouping; one launch when all gradients share a dtype) over every gradient, each program
   writing the norm of its span of one gradient (``grad_norm2``/``grad_norm_inf`` of that span);
2. stage two: ONE launch of one program, the same declared op over those partial norms (a norm
   is the norm of its parts' norms: the plan proves the op is its own combiner), into the total;
3. the scale: ONE multi-tensor launch per dtype of ``clip_by_norm`` over every gradient, in place,
   ``g*min(1, max_norm/(total + 1e-6))`` with the total read from its device tensor: nothing comes
   back to the host, except where ``error_if_nonfinite`` reads the total, as torch's check does.

``clip_grad_value_`` is one multi-tensor launch of ``clip_by_value`` per dtype, in place. A
gradient that is not contiguous is clipped in a contiguous copy and copied back (one more copy
for that tensor alone).

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


def _size(g) -> int:
    return g.size if isinstance(g, np.ndarray) else g.numel()


def _empty_norm(target: str):
    if target == "numpy":
        return np.array(0.0)
    import torch

    return torch.tensor(0.0)


def _in_place(module, grads, *scalars, **params) -> None:
    """``module.forward_multi`` over every gradient, written over them: contiguous tensors in
    place; any other through a contiguous copy, copied back (NumPy writes any layout itself)."""
    if grads and isinstance(grads[0], np.ndarray):
        module.forward_multi(grads, *scalars, out=grads, **params)
        return
    work = [g if g.is_contiguous() else g.contiguous() for g in grads]
    module.forward_multi(work, *scalars, out=work, **params)
    for g, w in zip(grads, work):
        if w is not g:
            g.copy_(w)


def _total_norm(grads, p: float, target: str, error_if_nonfinite: bool):
    if not grads:
        return _empty_norm(target)
    if p == math.inf:
        for i, g in enumerate(grads):
            if _size(g) == 0:
                raise ValueError(f"gradient {i} is empty: its inf-norm (a max) is undefined, as torch refuses it")
    total = load_module(_NORM_OPS[p], target).forward_multi(grads)  # stage one and stage two
    if error_if_nonfinite and not math.isfinite(float(total)):  # a host sync, as torch's check is
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    return total


def _clip_norm(grads, max_norm, norm_type, error_if_nonfinite, target):
    p, max_norm = _norm_type(norm_type), _check_max_norm(max_norm)
    total = _total_norm(grads, p, target, error_if_nonfinite)
    if grads:
        _in_place(load_module("clip_by_norm", target), grads, total, max_norm=max_norm)
    return total


def _clip_value(grads, clip_value, target):
    if grads:
        _in_place(load_module("clip_by_value", target), grads, clip_value=float(clip_value))


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
