"""Where symgrad.nn finds its kernels: the generated Triton modules, loaded once per op.

The one place that knows how ``symgrad.nn`` reaches the generated code (``symgrad.compose``'s
loader, which resolves ``generated.triton.<op>`` in a checkout and ``symgrad.generated.triton.<op>``
once installed) and whether a tensor's device can run it.
"""
from __future__ import annotations

import os

import torch

from ..compose import GraphError, load_module

__all__ = ["kernel", "has_kernel", "check_device", "Unsupported"]


class Unsupported(NotImplementedError):
    """An option or input symgrad.nn cannot serve; the message names it. Never a silently
    different result: torch's own module computes it."""


def has_kernel(op: str) -> bool:
    try:
        load_module(op, "triton")
    except GraphError:
        return False
    return True


def kernel(op: str, option: str | None = None):
    """The generated Triton module of ``op``. ``option`` names what needed it, for the error a
    missing module raises (an option whose variant op has not been generated)."""
    try:
        return load_module(op, "triton")
    except GraphError as e:
        what = f"{option} needs" if option else "needs"
        raise Unsupported(f"symgrad.nn: {what} the generated op {op!r}, which is missing ({e})") from None


def _interpreted() -> bool:
    # Triton's own jit functions (tl.cdiv) are made when triton is first imported, interpreted or
    # not; kernels decorated later follow the environment then. Ask triton's: a TRITON_INTERPRET set
    # after that import leaves them compiled-only, and a generated kernel calling one fails.
    import triton.language as tl

    return type(tl.cdiv).__name__ == "InterpretedFunction"


def check_device(name: str, t: torch.Tensor) -> None:
    """CUDA tensors run compiled; CPU tensors only through Triton's interpreter, which must have
    been chosen before triton was imported. Anything else is a clear error naming the fix."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"symgrad.nn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if _interpreted():
            return
        set_late = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        raise RuntimeError(
            f"symgrad.nn: {name} is a CPU tensor; symgrad's Triton kernels run on CPU only through "
            "Triton's interpreter, which must be chosen before triton is first imported: start Python "
            "with TRITON_INTERPRET=1 (e.g. `TRITON_INTERPRET=1 python train.py`)"
            + ("; TRITON_INTERPRET is set now, but triton was imported before it was" if set_late else ""))
    raise RuntimeError(f"symgrad.nn: {name} is on {t.device}; symgrad's Triton kernels need CUDA tensors "
                       "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)")
