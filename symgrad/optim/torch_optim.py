"""``torch.optim.Optimizer`` subclasses whose step is a generated update rule.

    opt = symgrad.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    loss.backward(); opt.step(); opt.zero_grad()

Options, defaults, ``param_groups`` and ``state`` are torch's (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ``grad_avg``, ``sum``), so a checkpoint of
the torch optimizer loads into this one and back. Works under ``torch.amp.GradScaler``, which
unscales the gradients and calls ``step`` as for any optimizer.

Two keyword-only options of symgrad's own:

``backend``         ``"triton"``: the rule's generated Triton module, one multi-tensor launch per
                    group (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); ``"numpy"``: the
                    generated NumPy module, in place on the CPU tensors' memory; default: triton on
                    CUDA, numpy on CPU.
``master_weights``  keep an fp32 copy of every bf16/fp16 parameter (``state["master_param"]``): the
                    rule updates the copy in fp32 and the parameter gets its rounded value, so small
                    updates are not lost to the parameter's precision. State is fp32 then too.
"""
from __future__ import annotations

import torch

from .rules import ALGORITHMS, generated_module, scalar_names, state_names, update_rule

_LOW = (torch.float16, torch.bfloat16)


class RuleOptimizer(torch.optim.Optimizer):
    algorithm = ""  # a key of symgrad.optim.rules.ALGORITHMS

    def __init__(self, params, *, backend: str | None = None, master_weights: bool = False, **options):
        algo = ALGORITHMS[self.algorithm]
        unknown = sorted(set(options) - set(algo.defaults))
        if unknown:
            raise TypeError(f"{self.algorithm}: unknown option {unknown[0]!r}; options are {sorted(algo.defaults)}")
        if backend not in (None, "numpy", "triton"):
            raise ValueError(f"{self.algorithm}: backend must be 'numpy', 'triton' or None, got {backend!r}")
        defaults = {**algo.defaults, **options}
        algo.check(defaults)
        self.backend, self.master_weights = backend, bool(master_weights)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in ALGORITHMS[self.algorithm].defaults.items():
                group.setdefault(k, v)

    def _backend(self, p: torch.Tensor) -> str:
        if self.backend is not None:
            return self.backend
        return "numpy" if p.device.type == "cpu" else "triton"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        algo = ALGORITHMS[self.algorithm]
        for group in self.param_groups:
            for k, v in algo.defaults.items():  # a torch checkpoint's group may predate an option
                group.setdefault(k, v)
            algo.check(group)
            rule = update_rule(algo.rule(group))
            names = state_names(rule)
            buckets: dict = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.algorithm} (symgrad) does not support sparse gradients")
                state = self.state[p]
                master = self.master_weights and p.dtype in _LOW
                if master and "master_param" not in state:
                    state["master_param"] = p.detach().float().clone(memory_format=torch.contiguous_format)
                first = all(name not in state for name in names) if names else "step" not in state
                sdtype = torch.float32 if master else p.dtype
                for name in names:
                    if name not in state:
                        state[name] = torch.full_like(p, algo.initial(name, group), dtype=sdtype,
                                                      memory_format=torch.contiguous_format)
                backend = self._backend(p)
                if algo.has_step:
                    if "step" not in state:
                        # torch keeps the count as a float32 tensor (on the device for fused/capturable)
                        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if backend == "triton" else "cpu")
                    state["step"] += 1
                    t = state["step"]
                else:  # SGD: the rule reads t only to tell the first step (v = g) from the others
                    t = 1.0 if first else 2.0
                key = (backend, master, p.device, float(t) if backend == "numpy" or not algo.has_step else None)
                buckets.setdefault(key, []).append((p, state, t))
            for (backend, master, _, t), items in buckets.items():
                run = _run_numpy if backend == "numpy" else _run_triton
                run(rule, names, algo.params(group), group["lr"], t, items, master)
        return loss


def _run_numpy(rule, names, params, lr, t, items, master) -> None:
    """The generated NumPy rule, in place on the CPU tensors' memory (fp32 masters for bf16/fp16)."""
    def view(x):
        if x.device.type != "cpu":
            raise RuntimeError(f"{rule.name}: the numpy backend updates CPU tensors; this one is on {x.device}")
        if not x.is_contiguous():
            raise RuntimeError(f"{rule.name}: the numpy backend updates contiguous tensors in place")
        return x.detach().numpy()

    ps, gs = [], []
    for p, state, _ in items:
        if p.dtype in _LOW and not master:
            raise RuntimeError(f"{rule.name}: a {p.dtype} parameter needs master_weights=True on the numpy backend "
                               "(NumPy computes in float32/float64)")
        ps.append(view(state["master_param"] if master else p))
        g = p.grad
        gs.append(g.detach().float().numpy() if g.dtype == torch.bfloat16 else g.detach().contiguous().numpy())
    states = [[view(state[name]) for _, state, _ in items] for name in names]
    values = {"lr": float(lr), "t": t}
    generated_module(rule.name, "numpy").update(ps, gs, *states, *(values[s] for s in scalar_names(rule)), **params)
    if master:
        for p, state, _ in items:
            p.copy_(state["master_param"])


def _run_triton(rule, names, params, lr, t, items, master) -> None:
    """The generated Triton rule: one multi-tensor launch; lr and the step counts are device tensors."""
    device = items[0][0].device
    ps = [p for p, _, _ in items]
    gs = [p.grad for p, _, _ in items]
    states = [[state[name] for _, state, _ in items] for name in names]
    lr_t = lr if isinstance(lr, torch.Tensor) else torch.tensor([float(lr)], dtype=torch.float64, device=device)
    if t is None:  # one step count per parameter, gathered on the device (no host sync)
        t = torch.stack([s["step"] for _, s, _ in items]).to(device=device, dtype=torch.float32)
    values = {"lr": lr_t, "t": t}
    masters = [state["master_param"] for _, state, _ in items] if master else None
    generated_module(rule.name, "triton").update(ps, gs, *states, *(values[s] for s in scalar_names(rule)),
                                                 master=masters, **params)


def _make(name: str):
    doc = (f"torch.optim.{name}: the same options, defaults and state_dict, stepping with symgrad's generated "
           f"update rule (see symgrad.optim.torch_optim for backend= and master_weights=).")
    return type(name, (RuleOptimizer,), {"algorithm": name, "__doc__": doc, "__module__": "symgrad.optim"})


SGD = _make("SGD")
Adam = _make("Adam")
AdamW = _make("AdamW")
RMSprop = _make("RMSprop")
Adagrad = _make("Adagrad")
