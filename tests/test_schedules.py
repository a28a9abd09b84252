"""Learning-rate schedules declared in symgrad/ops/schedules.py, evaluated by the generated modules
(symgrad.optim.schedules), against torch.optim.lr_scheduler at every step of a 1000-step run: torch
steps recursively, the declarations are closed forms; float64 agrees to 1e-12."""
import math
import warnings

import numpy as np
import pytest
import torch

from symgrad.optim import schedules

STEPS = 1000


def torch_lrs(make, steps=STEPS, lr=0.1):
    """The lr torch's scheduler gives at each step of an SGD run (read before each optimizer step)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's internal step(0) warns about the epoch argument
        sched = make(opt)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return np.array(out)


def torch_warmup_cosine(lr, warmup, total, start_factor, eta_min, steps=STEPS):
    L = torch.optim.lr_scheduler
    return torch_lrs(lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=start_factor, end_factor=1.0, total_iters=warmup),
                                                    L.CosineAnnealingLR(o, T_max=total - warmup, eta_min=eta_min)],
                                              milestones=[warmup]), steps, lr)


WARMUP_COSINE = [  # lr, warmup, total_steps, start_factor, eta_min
    (0.3, 50, 1000, 0.1, 1e-4),
    (1.0, 10, 1000, 0.01, 0.0),
    (0.1, 1, 1000, 0.5, 0.05),
    (3e-4, 100, 1000, 1 / 3, 3e-5),
]


@pytest.mark.parametrize("lr, warmup, total, start_factor, eta_min", WARMUP_COSINE)
def test_warmup_cosine_equals_torch_at_every_step(lr, warmup, total, start_factor, eta_min):
    ref = torch_warmup_cosine(lr, warmup, total, start_factor, eta_min)
    sched = schedules.warmup_cosine(lr, warmup, total, start_factor=start_factor, eta_min=eta_min)
    np.testing.assert_allclose(sched.values(range(STEPS)), ref, rtol=1e-12, atol=0)
    stepped = []
    for _ in range(STEPS):  # step() walks the same values
        stepped.append(sched.get_last_lr())
        sched.step()
    np.testing.assert_allclose(stepped, ref, rtol=1e-12, atol=0)
    assert sched.step_count == STEPS
    # the shape a person expects: the start, the top at the end of warmup, the floor at the end
    assert ref[0] == pytest.approx(lr * start_factor) and ref[warmup] == pytest.approx(lr)
    assert ref.argmax() == warmup and ref[-1] == pytest.approx(eta_min, abs=lr * 1e-5)


def test_warmup_cosine_past_its_end_rises_as_torch():
    """Past total_steps torch's cosine rises again (its recursion's error grows near the minimum,
    so compare to the learning rate's scale there)."""
    ref = torch_warmup_cosine(0.1, 100, 400, 0.2, 1e-3)
    ours = schedules.warmup_cosine(0.1, 100, 400, start_factor=0.2, eta_min=1e-3).values(range(STEPS))
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-15)
    assert ours[400] == pytest.approx(1e-3) and ours[700] == pytest.approx(0.1)  # the floor, then the top again


@pytest.mark.parametrize("lr, step_size, gamma", [(0.1, 30, 0.5), (1.0, 7, 0.9), (0.3, 1, 0.99), (0.05, 1000, 0.1)])
def test_step_decay_equals_torch_at_every_step(lr, step_size, gamma):
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=step_size, gamma=gamma), lr=lr)
    np.testing.assert_allclose(schedules.step_decay(lr, step_size, gamma).values(range(STEPS)), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("lr, warmup, start_factor, step_size, gamma", [(0.1, 20, 0.1, 30, 0.5), (1.0, 1, 0.5, 7, 0.9)])
def test_warmup_then_step_decay_equals_torch_at_every_step(lr, warmup, start_factor, step_size, gamma):
    L = torch.optim.lr_scheduler
    ref = torch_lrs(lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=start_factor, end_factor=1.0, total_iters=warmup),
                                                   L.StepLR(o, step_size=step_size, gamma=gamma)], milestones=[warmup]), lr=lr)
    ours = schedules.step_decay(lr, step_size, gamma, warmup=warmup, start_factor=start_factor).values(range(STEPS))
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)


def test_triton_schedule_writes_one_device_tensor():
    """On the Triton target the step and the lr live in device tensors that step() rewrites in
    place: an optimizer holding ``sched.lr`` reads each step's value."""
    ref = torch_warmup_cosine(0.1, 5, 40, 0.1, 1e-3, steps=40)
    sched = schedules.warmup_cosine(0.1, 5, 40, start_factor=0.1, eta_min=1e-3, target="triton")
    lr, t = sched.lr, sched.t
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float32 and lr.shape == (1,)
    seen = []
    for _ in range(40):
        seen.append(lr.item())
        sched.step()
    assert sched.lr is lr and sched.t is t and t.item() == 40.0
    np.testing.assert_allclose(seen, ref, rtol=2e-6, atol=0)
    np.testing.assert_allclose(sched.values(range(40)), ref, rtol=2e-6, atol=0)
    steps = schedules.step_decay(0.1, 3, 0.5, target="triton")
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), steps=10, lr=0.1)
    np.testing.assert_allclose(steps.values(range(10)), ref, rtol=1e-6, atol=0)


def test_bad_schedules_are_clear_errors():
    with pytest.raises(ValueError, match="total_steps .5. must exceed warmup .5."):
        schedules.warmup_cosine(0.1, 5, 5)
    with pytest.raises(ValueError, match="param warmup must be an integer >= 1, got 0"):
        schedules.warmup_cosine(0.1, 0, 10)
    with pytest.raises(TypeError, match="param 'step_size' must be an integer, got 2.5"):
        schedules.step_decay(0.1, 2.5)
    with pytest.raises(ValueError, match="param lr must be in"):
        schedules.step_decay(-0.1, 2)
    with pytest.raises(ValueError, match=r"param lr must be in"):
        schedules.step_decay(math.nan, 2)
    with pytest.raises(ValueError, match="'softmax' is not a schedule"):
        schedules.Schedule("softmax")
    with pytest.raises(ValueError, match="target must be 'numpy' or 'triton'"):
        schedules.Schedule("step_decay", target="jax", lr=0.1, step_size=2)


def test_fused_optimizer_reads_the_schedules_device_lr():
    """symgrad.optim's Triton update reads its lr from ``sched.lr`` each step: the run equals torch's
    SGD under the same SequentialLR, and the group's lr is the one tensor throughout."""
    import symgrad.optim as optim

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(37))
    q = torch.nn.Parameter(p.detach().clone())
    sched = schedules.warmup_cosine(0.1, 3, 12, start_factor=0.1, eta_min=1e-3, target="triton")
    opt = optim.SGD([p], lr=sched.lr, momentum=0.9, backend="triton")
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    L = torch.optim.lr_scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_sched = L.SequentialLR(ref, [L.LinearLR(ref, 0.1, 1.0, 3), L.CosineAnnealingLR(ref, 9, 1e-3)], [3])
        for _ in range(12):
            g = torch.randn(37)
            p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
            sched.step()
            ref_sched.step()
    assert opt.param_groups[0]["lr"] is sched.lr
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)
