"""``patch(model)``: swap a model's torch modules for symgrad's, in place, sharing their parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import modules as M

__all__ = ["patch", "Patched", "SWAPS"]

#: torch module type -> the symgrad module that serves it. Only these exact types are swapped: a
#: subclass may override forward, and swapping it would change what it computes.
SWAPS: dict[type, type] = {
    torch.nn.Linear: M.Linear,
    torch.nn.Conv2d: M.Conv2d,
    torch.nn.GELU: M.GELU,
    torch.nn.SiLU: M.SiLU,
    torch.nn.Softmax: M.Softmax,
    torch.nn.LogSoftmax: M.LogSoftmax,
    torch.nn.LayerNorm: M.LayerNorm,
    torch.nn.RMSNorm: M.RMSNorm,
    torch.nn.CrossEntropyLoss: M.CrossEntropyLoss,
    torch.nn.BCEWithLogitsLoss: M.BCEWithLogitsLoss,
    torch.nn.MSELoss: M.MSELoss,
}


@dataclass
class Patched:
    """What ``patch`` did: ``swapped`` maps each module's qualified name to its new type's name;
    ``skipped`` maps each matching module it left alone to why (an option symgrad cannot serve)."""

    swapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  {name}: {kind}" for name, kind in self.swapped.items()]
        lines += [f"  {name}: skipped, {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def patch(model: torch.nn.Module) -> Patched:
    """Replace, in place, every submodule of ``model`` whose type is one of :data:`SWAPS`' keys
    with the symgrad module serving it. The new module holds the old one's Parameter and buffer
    objects (an optimizer built before keeps working; nothing is copied), hooks and training mode.
    A module whose configuration symgrad cannot serve is left as it is and reported in
    ``skipped``; ``model`` itself is never replaced (swap it by patching its parent)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: expected a torch.nn.Module, got {type(model).__name__}")
    result, done = Patched(), {}  # done: id(old module) -> its replacement (a module shared by parents)
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            cls = SWAPS.get(type(child))
            if cls is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) not in done:
                why = cls.unsupported(child)
                if why:
                    result.skipped[name] = why
                    continue
                done[id(child)] = cls.from_torch(child)
            setattr(parent, child_name, done[id(child)])
            result.swapped[name] = f"torch.nn.{type(child).__name__} -> symgrad.nn.{cls.__name__}"
    return result
