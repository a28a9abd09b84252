"""Which declared update rule an optimizer's param group runs, with which params, and its state.

One table for every front end (the torch optimizers and the NumPy ones): a torch.optim-style
optimizer is a name, torch's defaults, a function choosing the update rule (an op of kind
``"update"``, :mod:`symgrad.ops.optim` or a user's) from a group's options, and a function mapping
the group's options to the rule's params. The rule's state tensors are its inputs other than the
parameter ``p`` and the gradient ``g``, named as torch names its state keys (``exp_avg``,
``momentum_buffer``...), so a torch checkpoint's state loads as it is.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

from ..declare import REGISTRY, Op


@dataclass(frozen=True)
class Algorithm:
    name: str  # torch's class name
    defaults: dict  # torch's defaults, the same keys
    rule: Callable[[dict], str]  # group -> the update rule's op name
    params: Callable[[dict], dict]  # group -> the rule's params
    check: Callable[[dict], None] = lambda group: None  # raises ValueError naming a bad option
    has_step: bool = True  # torch keeps state["step"] (SGD does not)
    initial: Callable[[str, dict], float] = lambda name, group: 0.0  # a state tensor's starting value


def _range(name: str, value, low=0.0, high=math.inf, high_open=False, low_open=False) -> None:
    v = float(value)
    ok = (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    if not ok or math.isnan(v):
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"Invalid {name} value: {value} (must be in {lo}, {hi})")


def _no_maximize(group: dict) -> None:
    if group.get("maximize"):
        raise ValueError("maximize=True is not supported by symgrad's update rules (negate the loss instead)")
    if group.get("differentiable"):
        raise ValueError("differentiable=True is not supported: symgrad's update rules are not differentiated")


def _lr(group):
    lr = group["lr"]
    if not hasattr(lr, "shape"):
        _range("learning rate", lr)


def _check_sgd(group):
    _no_maximize(group)
    _lr(group)
    _range("momentum", group["momentum"])
    _range("weight_decay", group["weight_decay"])
    _range("l1", group.get("l1", 0.0))
    _range("dampening", group["dampening"], 0.0, 1.0)
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if group.get("l1", 0.0) and group["momentum"] != 0:
        raise ValueError("l1 is declared for plain SGD only (momentum=0)")


def _sgd_rule(group):
    if group["momentum"] == 0:
        return "sgd"
    return "nesterov" if group["nesterov"] else "sgd_momentum"


def _sgd_params(group):
    if group["momentum"] == 0:
        return {"weight_decay": group["weight_decay"], "l1": group.get("l1", 0.0)}
    return {"momentum": group["momentum"], "dampening": group["dampening"], "weight_decay": group["weight_decay"]}


def _check_adam(group):
    _no_maximize(group)
    _lr(group)
    _range("epsilon", group["eps"])
    _range("beta parameter at index 0", group["betas"][0], 0.0, 1.0, high_open=True)
    _range("beta parameter at index 1", group["betas"][1], 0.0, 1.0, high_open=True)
    _range("weight_decay", group["weight_decay"])


def _adam_params(group):
    return {"beta1": float(group["betas"][0]), "beta2": float(group["betas"][1]), "eps": group["eps"],
            "weight_decay": group["weight_decay"]}


def _adam_rule(group):
    # torch's Adam(decoupled_weight_decay=True) is AdamW: the option, not the class, picks the rule
    return ("adamw" if group.get("decoupled_weight_decay") else "adam") + ("_amsgrad" if group["amsgrad"] else "")


def _check_rmsprop(group):
    _no_maximize(group)
    _lr(group)
    _range("epsilon", group["eps"])
    _range("momentum", group["momentum"])
    _range("weight_decay", group["weight_decay"])
    _range("alpha", group["alpha"], 0.0, 1.0)


def _rmsprop_rule(group):
    return "rmsprop" + ("_centered" if group["centered"] else "") + ("_momentum" if group["momentum"] > 0 else "")


def _rmsprop_params(group):
    out = {"alpha": group["alpha"], "eps": group["eps"], "weight_decay": group["weight_decay"]}
    if group["momentum"] > 0:
        out["momentum"] = group["momentum"]
    return out


def _check_adagrad(group):
    _no_maximize(group)
    _lr(group)
    _range("lr_decay", group["lr_decay"])
    _range("weight_decay", group["weight_decay"])
    _range("initial_accumulator_value", group["initial_accumulator_value"])
    _range("epsilon", group["eps"])


_TORCH_FLAGS = {"maximize": False, "foreach": None, "differentiable": False}

ALGORITHMS = {
    "SGD": Algorithm(
        "SGD", {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, **_TORCH_FLAGS,
                "fused": None, "l1": 0.0},
        _sgd_rule, _sgd_params, _check_sgd, has_step=False),
    "Adam": Algorithm(
        "Adam", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, **_TORCH_FLAGS,
                 "capturable": False, "fused": None, "decoupled_weight_decay": False},
        _adam_rule, _adam_params, _check_adam),
    "AdamW": Algorithm(
        "AdamW", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False, **_TORCH_FLAGS,
                  "capturable": False, "fused": None, "decoupled_weight_decay": True},
        _adam_rule, _adam_params, _check_adam),
    "RMSprop": Algorithm(
        "RMSprop", {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False,
                    "capturable": False, **_TORCH_FLAGS},
        _rmsprop_rule, _rmsprop_params, _check_rmsprop),
    "Adagrad": Algorithm(
        "Adagrad", {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10,
                    **_TORCH_FLAGS, "fused": None},
        lambda g: "adagrad", lambda g: {"lr_decay": g["lr_decay"], "weight_decay": g["weight_decay"], "eps": g["eps"]},
        _check_adagrad, initial=lambda name, g: float(g["initial_accumulator_value"]) if name == "sum" else 0.0),
}


def update_rule(name: str) -> Op:
    """The registered update rule ``name`` (importing the library's rules first)."""
    from .. import ops  # noqa: F401  (registers the library's rules)

    op = REGISTRY.get(name)
    if op.kind != "update":
        raise ValueError(f"op {name} is not an update rule (its outputs are not new values of its inputs)")
    return op


def state_names(op: Op) -> tuple[str, ...]:
    """The rule's state tensors: its tensor inputs after ``p`` and ``g``, in declaration order."""
    tensors = [t.name for t in op.inputs if t.dims]
    if tensors[:2] != ["p", "g"]:
        raise ValueError(f"update rule {op.name}: its first tensor inputs must be the parameter p and its gradient g, "
                         f"got {tensors[:2]}")
    return tuple(tensors[2:])


def scalar_names(op: Op) -> tuple[str, ...]:
    """The rule's scalar inputs (``lr``, ``t``), in declaration order."""
    return tuple(t.name for t in op.inputs if not t.dims)


def generated_module(name: str, target: str):
    """The generated module of update rule ``name`` for ``target`` (``numpy`` or ``triton``)."""
    from ..project import modules_for

    return importlib.import_module(modules_for(name)[target])
