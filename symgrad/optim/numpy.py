"""torch.optim's optimizers over NumPy arrays, running the generated NumPy update rules.

    from symgrad.optim.numpy import AdamW
    opt = AdamW([W1, b1, W2, b2], lr=1e-3, weight_decay=1e-2)
    opt.step([dW1, db1, dW2, db2])   # the arrays are updated in place

The same options, defaults, ``param_groups`` and state keys as torch (``state_dict()`` holds arrays
where torch holds tensors). ``step(grads)`` takes one gradient per parameter, in the order of
``param_groups`` (None: that parameter is skipped, as torch skips a parameter without ``.grad``).
Each group is one call of its rule's generated ``update`` (one pass over every tensor of the group);
parameters whose step counts differ (a group extended after some steps) go in one call per count.
"""
from __future__ import annotations

import copy

import numpy as np

from .rules import ALGORITHMS, generated_module, scalar_names, state_names, update_rule


class Optimizer:
    """A torch.optim-style optimizer over float32/float64 NumPy arrays, updated in place."""

    algorithm = ""  # a key of symgrad.optim.rules.ALGORITHMS

    def __init__(self, params, **options):
        algo = ALGORITHMS[self.algorithm]
        unknown = sorted(set(options) - set(algo.defaults))
        if unknown:
            raise TypeError(f"{self.algorithm}: unknown option {unknown[0]!r}; options are {sorted(algo.defaults)}")
        self.defaults = {**algo.defaults, **options}
        params = list(params)
        if not params:
            raise ValueError(f"{self.algorithm}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group: dict) -> None:
        group = {**self.defaults, **group, "params": list(group["params"])}
        for k, p in enumerate(group["params"]):
            if not isinstance(p, np.ndarray) or p.dtype not in (np.float32, np.float64):
                raise TypeError(f"{self.algorithm}: parameter {k} must be a float32 or float64 NumPy array")
            if not p.flags.c_contiguous or not p.flags.writeable:
                raise ValueError(f"{self.algorithm}: parameter {k} must be a writable C-contiguous array (updated in place)")
        ALGORITHMS[self.algorithm].check(group)
        self.param_groups.append(group)

    @property
    def params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def step(self, grads) -> None:
        """One update of every parameter that has a gradient in ``grads`` (in parameter order)."""
        grads = list(grads)
        params = self.params
        if len(grads) != len(params):
            raise ValueError(f"{self.algorithm}.step: got {len(grads)} gradients for {len(params)} parameters")
        algo = ALGORITHMS[self.algorithm]
        k = 0
        for group in self.param_groups:
            algo.check(group)
            rule = update_rule(algo.rule(group))
            names, scalars = state_names(rule), scalar_names(rule)
            update = generated_module(rule.name, "numpy").update
            buckets: dict = {}
            for p in group["params"]:
                g = grads[k]
                index = k
                k += 1
                if g is None:
                    continue
                if np.shape(g) != p.shape:
                    raise ValueError(f"{self.algorithm}.step: gradient {index} has shape {np.shape(g)}, its parameter {p.shape}")
                state = self.state.setdefault(index, {})
                first = not state
                for name in names:
                    if name not in state:
                        state[name] = np.full_like(p, algo.initial(name, group))
                state["step"] = state.get("step", 0.0) + 1.0
                # SGD keeps no step in torch's state: its rule reads t only to tell the first step
                t = state["step"] if algo.has_step else (1.0 if first else 2.0)
                buckets.setdefault(t, []).append((p, g, state))
            for t, items in buckets.items():
                tensors = [[p for p, _, _ in items], [g for _, g, _ in items]]
                tensors += [[s[name] for _, _, s in items] for name in names]
                values = {"lr": group["lr"], "t": t}
                update(*tensors, *(values[s] for s in scalars), **algo.params(group))

    def zero_grad(self) -> None:  # gradients are arguments here; kept for torch's loop shape
        pass

    def state_dict(self) -> dict:
        """torch's format: ``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``."""
        groups, k = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{key: copy.deepcopy(v) for key, v in g.items() if key != "params"}, "params": list(range(k, k + n))})
            k += n
        state = {i: {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in s.items()
                     if ALGORITHMS[self.algorithm].has_step or key != "step"} for i, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this class's or torch's ``state_dict()`` (tensors are converted to arrays)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError(f"{self.algorithm}.load_state_dict: the saved param groups do not match this optimizer's")
        params = self.params
        order = [i for g in groups for i in g["params"]]
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for pos, saved_id in enumerate(order):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            p = params[pos]
            st = {}
            for key, v in saved.items():
                if key == "step":
                    st[key] = float(v.item() if hasattr(v, "item") else v)
                else:
                    a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
                    st[key] = np.ascontiguousarray(a.reshape(p.shape), dtype=p.dtype).copy()
            if not ALGORITHMS[self.algorithm].has_step:
                st["step"] = 1.0  # not the first step: the buffers exist
            self.state[pos] = st


def _make(name: str):
    doc = f"torch.optim.{name}'s algorithm, options and state over NumPy arrays (symgrad.optim.numpy)."
    return type(name, (Optimizer,), {"algorithm": name, "__doc__": doc, "__module__": __name__})


SGD = _make("SGD")
Adam = _make("Adam")
AdamW = _make("AdamW")
RMSprop = _make("RMSprop")
Adagrad = _make("Adagrad")

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad"]
