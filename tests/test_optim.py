"""symgrad.optim against torch.optim, step by step for 100 steps, on several tensors of odd sizes.

float64 agrees to 1e-12 relative, float32 to 1e-6 (relative to each tensor's largest entry: an
entry near 0 has no relative precision of its own). Both the NumPy optimizers
(symgrad.optim.numpy) and the torch optimizers (symgrad.optim, numpy backend; the Triton backend is
in test_optim_triton.py) are checked, with and without weight decay, momentum, dampening, Nesterov,
centering, amsgrad and lr_decay; then state_dict round trips with torch's optimizer, GradScaler,
bf16 with fp32 master weights, and bad options.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import symgrad.ops  # noqa: F401  (registers the update rules)
import symgrad.optim as so
import symgrad.optim.numpy as son
from symgrad.declare import REGISTRY
from symgrad.optim.rules import ALGORITHMS

SHAPES = [(3, 5), (41,), (1,), (7, 3, 2), (1023,)]
STEPS = 100
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}

CONFIGS = [
    ("SGD", {"lr": 0.05}),
    ("SGD", {"lr": 0.05, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.9, "weight_decay": 0.01}),  # the exponential average
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.99)}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.0}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "centered": True, "weight_decay": 0.1}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True, "alpha": 0.9}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.5}),
]
IDS = [f"{name}-" + "-".join(f"{k}{v}" for k, v in opts.items()) for name, opts in CONFIGS]


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def assert_tracks(got, want, tol, what):
    for k, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        scale = max(np.max(np.abs(b)), 1e-30)
        err = np.max(np.abs(a - b)) / scale
        assert err <= tol, f"{what}: tensor {k} (shape {b.shape}) differs from torch by {err:.3g} relative > {tol:g}"


def _torch_run(name, opts, params, grads):
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = getattr(torch.optim, name)(ps, foreach=False, **opts)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return ps, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name, opts", CONFIGS, ids=IDS)
def test_numpy_optimizer_matches_torch(name, opts, dtype):
    params, grads = _problem(dtype)
    want, _ = _torch_run(name, opts, params, grads)
    arrays = [p.numpy().copy() for p in params]
    opt = getattr(son, name)(arrays, **opts)
    for gs in grads:
        opt.step([g.numpy() for g in gs])
    assert_tracks(arrays, [p.detach().numpy() for p in want], TOL[dtype], f"symgrad.optim.numpy.{name}({opts})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name, opts", CONFIGS, ids=IDS)
def test_torch_optimizer_matches_torch(name, opts, dtype):
    params, grads = _problem(dtype, seed=1)
    want, ref = _torch_run(name, opts, params, grads)
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = getattr(so, name)(ps, backend="numpy", **opts)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    assert_tracks([p.detach() for p in ps], [p.detach() for p in want], TOL[dtype], f"symgrad.optim.{name}({opts})")
    # the same state, under torch's keys
    mine, theirs = opt.state_dict(), ref.state_dict()
    for k, st in theirs["state"].items():
        assert set(mine["state"][k]) == set(st), f"{name}: state keys {sorted(mine['state'][k])} != torch's {sorted(st)}"
        for key, v in st.items():
            assert_tracks([mine["state"][k][key]], [v], TOL[dtype], f"{name}: state {key}")
    assert [sorted(g) for g in mine["param_groups"]] == [sorted(g) for g in theirs["param_groups"]] or name == "SGD"


@pytest.mark.parametrize("name, opts", [CONFIGS[4], CONFIGS[7], CONFIGS[10], CONFIGS[14], CONFIGS[16]],
                         ids=[IDS[4], IDS[7], IDS[10], IDS[14], IDS[16]])
def test_state_dict_round_trip_with_torch(name, opts):
    """50 steps in torch, its checkpoint loaded into symgrad, 50 more; and the other way round."""
    params, grads = _problem(torch.float64, seed=2)
    want, _ = _torch_run(name, opts, params, grads)
    for first, second in ((torch.optim, so), (so, torch.optim)):
        ps = [p.clone().requires_grad_(True) for p in params]
        kw = {"foreach": False} if first is torch.optim else {"backend": "numpy"}
        opt = getattr(first, name)(ps, **kw, **opts)
        for gs in grads[:50]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        kw = {"foreach": False} if second is torch.optim else {"backend": "numpy"}
        opt2 = getattr(second, name)(ps, **kw, **opts)
        opt2.load_state_dict(opt.state_dict())
        for gs in grads[50:]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt2.step()
        assert_tracks([p.detach() for p in ps], [p.detach() for p in want], 1e-12, f"{name}: {first.__name__} -> {second.__name__}")


def test_numpy_state_dict_loads_torch_checkpoint():
    params, grads = _problem(torch.float64, seed=3)
    want, _ = _torch_run("AdamW", {"lr": 0.01}, params, grads)
    ps = [p.clone().requires_grad_(True) for p in params]
    ref = torch.optim.AdamW(ps, lr=0.01, foreach=False)
    for gs in grads[:30]:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        ref.step()
    arrays = [p.detach().numpy().copy() for p in ps]
    opt = son.AdamW(arrays, lr=0.01)
    opt.load_state_dict(ref.state_dict())
    for gs in grads[30:]:
        opt.step([g.numpy() for g in gs])
    assert_tracks(arrays, [p.detach().numpy() for p in want], 1e-12, "numpy AdamW from a torch checkpoint")


def test_grad_scaler_fp16():
    """torch.amp.GradScaler unscales, skips the step on inf gradients and calls step: as torch's AdamW."""
    torch.manual_seed(0)
    runs = []
    for opt_cls in (torch.optim.AdamW, so.AdamW):
        torch.manual_seed(0)
        model = torch.nn.Linear(13, 3)
        kw = {"foreach": False} if opt_cls is torch.optim.AdamW else {"backend": "numpy"}
        opt = opt_cls(model.parameters(), lr=1e-2, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        g = torch.Generator().manual_seed(1)
        for it in range(20):
            x = torch.randn(8, 13, generator=g)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(x).float().pow(2).mean()
            if it == 5:
                loss = loss * float("inf")  # an overflow: the scaler must skip this step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert_tracks(runs[1], runs[0], 1e-6, "GradScaler + AdamW")


def test_bf16_master_weights_track_fp32():
    """bf16 parameters with fp32 master weights follow the fp32 run to bf16's rounding of the
    parameter (2**-8 relative), while bf16 without masters drifts: small updates are lost."""
    params, grads = _problem(torch.float32, seed=4)
    fp32 = [p.clone().requires_grad_(True) for p in params]
    opt = so.AdamW(fp32, lr=1e-3, backend="numpy")
    low = [p.to(torch.bfloat16).requires_grad_(True) for p in params]
    opt_low = so.AdamW(low, lr=1e-3, backend="numpy", master_weights=True)
    for gs in grads:
        for p, q, g in zip(fp32, low, gs):
            p.grad, q.grad = g.clone(), g.to(torch.bfloat16)
        opt.step()
        opt_low.step()
    assert all(q.dtype == torch.bfloat16 for q in low)
    # masters: fp32 updates from bf16-rounded gradients; the parameter is their bf16 rounding
    masters = [opt_low.state[q]["master_param"] for q in low]
    assert_tracks(masters, [p.detach() for p in fp32], 2e-2, "bf16 + fp32 master vs fp32")
    for q, m in zip(low, masters):
        assert torch.equal(q.detach(), m.to(torch.bfloat16))


def test_options_and_errors():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        so.AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        so.Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Nesterov"):
        so.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="maximize"):
        so.SGD([p], lr=0.1, maximize=True)
    with pytest.raises(TypeError, match="unknown option 'beta'"):
        so.Adam([p], beta=0.9)
    with pytest.raises(ValueError, match="backend"):
        so.Adam([p], backend="cuda")
    q = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    q.grad = torch.ones(3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="master_weights=True"):
        so.Adam([q], backend="numpy").step()
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="2 gradients for 1 parameters"):
        son.SGD([a], lr=0.1).step([a, a])
    with pytest.raises(ValueError, match="gradient 0 has shape"):
        son.SGD([a], lr=0.1).step([np.zeros(5, np.float32)])
    # torch's defaults, under torch's keys
    for name, algo in ALGORITHMS.items():
        mine = getattr(so, name)([torch.zeros(2, requires_grad=True)], lr=0.1).defaults
        theirs = getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], lr=0.1).defaults
        assert {k: v for k, v in mine.items() if k in theirs} == {k: v for k, v in theirs.items() if k in mine}, name
        assert set(theirs) - set(mine) <= {"decoupled_weight_decay"}, f"{name}: torch has options {set(theirs) - set(mine)}"


def test_update_rules_declare_themselves():
    """Every rule is an op of kind "update" whose outputs all replace an input; none is differentiated."""
    rules = [op for op in REGISTRY if op.kind == "update"]
    assert {"sgd", "sgd_momentum", "nesterov", "rmsprop", "adam", "adamw", "adagrad"} <= {op.name for op in rules}
    for op in rules:
        assert not op.differentiable
        assert set(op.updates) == {o.name for o in op.outputs}


def test_a_users_update_rule_goes_through_the_same_pipeline(tmp_path, monkeypatch):
    """A rule declared outside the library (signSGD with decoupled decay: p <- p*(1 - lr*wd) - lr*sign(g))
    is checked, derived, lowered to one multi launch and printed like the library's rules."""
    import importlib.util

    import sympy as sp

    from symgrad.declare import Dim, Op, Param, Role, Tensor, idx, update
    from symgrad.derive import derive
    from symgrad.plan import lower
    from symgrad.traffic import multi_bytes
    from symgrad.targets import numpy as numpy_target

    n = Dim("N", "i")
    (i,) = idx("i")
    p, g = Tensor("p", (n,), Role.CONST), Tensor("g", (n,), Role.CONST)
    lr = Tensor("lr", (), Role.CONST)
    wd = Param("wd", 0.1, domain="[0, inf)")
    op = Op("sign_sgd", "p <- p*(1 - lr*wd) - lr*sign(g)", (p, g, lr),
            (update(p, i, p[i] * (1 - sp.Symbol("lr", real=True) * wd) - sp.Symbol("lr", real=True) * sp.sign(g[i])),),
            params=(wd,), test_sizes=({"N": 5},), module="tests.user_rule")
    plan = lower(derive(op))
    assert [launch.kind for launch in plan.forward.launches] == ["multi"] and not plan.backward.launches
    assert multi_bytes(plan, {"p": 2, "g": 2, "lr": 4}) == {"read": 4, "written": 2, "minimum_read": 4, "minimum_written": 2}
    path = tmp_path / "sign_sgd.py"
    path.write_text(numpy_target.render(plan, "symgrad generate sign_sgd --ops tests.user_rule"))
    spec = importlib.util.spec_from_file_location("sign_sgd_generated", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    ps = [rng.standard_normal(k) for k in (3, 17)]
    gs = [rng.standard_normal(k) for k in (3, 17)]
    gs[0][1] = 0.0
    want = [q * (1 - 0.01 * 0.1) - 0.01 * np.sign(x) for q, x in zip(ps, gs)]
    mod.update(ps, gs, 0.01)
    assert_tracks(ps, want, 1e-15, "a user's update rule")
    with pytest.raises(ValueError, match="wd must be in"):
        mod.update(ps, gs, 0.01, wd=-1.0)


def test_bad_update_declarations_are_refused():
    from symgrad.declare import DeclarationError, Dim, Op, Role, Tensor, idx, register, update

    n = Dim("N", "i")
    (i,) = idx("i")
    p, m, g = (Tensor(x, (n,), Role.CONST) for x in ("p", "m", "g"))
    with pytest.raises(DeclarationError, match="reads the old value of m"):
        register(Op("bad_order", "reads m after m_new overwrote it", (p, g, m),
                    (update(m, i, 0.9 * m[i] + g[i]), update(p, i, p[i] - m[i])), module="tests"))
    with pytest.raises(DeclarationError, match="not differentiated"):
        register(Op("bad_role", "a differentiable input", (Tensor("p", (n,)), g), (update(Tensor("p", (n,)), i, g[i]),), module="tests"))
    assert "bad_order" not in REGISTRY and "bad_role" not in REGISTRY


def test_numpy_optimizers_import_without_torch():
    """``pip install symgrad[examples]`` has no torch: the README's first command trains the digits
    example with the NumPy optimizers, which must not import torch on the way (symgrad.optim's
    package init imported the torch-facing classes, and the main job died on ModuleNotFoundError)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "import numpy as np\n"
        "from symgrad.optim import numpy as optim\n"
        "p = np.ones(3); opt = optim.AdamW([p], lr=0.1)\n"
        "opt.step([np.full(3, 0.5)])\n"
        "assert p.max() < 1.0, p\n"
        "import symgrad.optim\n"
        "try:\n"
        "    symgrad.optim.AdamW\n"
        "except ImportError:\n"
        "    print('torch-facing classes need torch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch-facing classes need torch" in proc.stdout
