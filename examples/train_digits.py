"""Train a two-layer network on scikit-learn's handwritten digits with generated gradients only.

    Z1 = X W1 + b1,  A1 = relu(Z1),  Z2 = A1 W2 + b2,  loss = softmax_cross_entropy(Z2, y)

The network is declared with ``symgrad.compose.Graph``; every forward and backward step calls the
generated modules (``generated.numpy.<op>`` by default, ``generated.triton.<op>`` with
``--target triton``). The update is a generated update rule too (``symgrad.optim.numpy`` on NumPy,
``symgrad.optim`` on Triton), as are the learning-rate schedule (``symgrad.optim.schedules``) and
gradient clipping (``symgrad.optim.clip``); the only other arithmetic here is the accuracy count.

    python examples/train_digits.py [--epochs 30] [--target numpy|triton] [--plot examples/digits_loss.png]
        [--optimizer sgd|momentum|adamw] [--lr LR] [--schedule none|warmup-cosine|step] [--clip-norm MAX]
    python examples/train_digits.py --compare [--schedule warmup-cosine]   # all three optimizers, one plot:
                                                                           # examples/digits_optimizers.png

Needs ``pip install scikit-learn matplotlib`` (the digits data ship inside scikit-learn). Exits
non-zero if the final test accuracy is below 95%.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from symgrad.compose import Graph

PARAMS = ("W1", "b1", "W2", "b2")
# Each optimizer with the options and learning rate it trains this network well with (--lr overrides).
OPTIMIZERS = {
    "sgd": ("SGD", {}, 0.1),
    "momentum": ("SGD", {"momentum": 0.9}, 0.02),
    "adamw": ("AdamW", {"weight_decay": 1e-2}, 2e-3),
}
SCHEDULES = ("none", "warmup-cosine", "step")


def build_graph() -> Graph:
    g = Graph()
    X, y = g.input("X"), g.input("y")
    W1, b1, W2, b2 = (g.param(n) for n in PARAMS)
    Z1 = g.op("linear", X, W1, b1, name="Z1")
    A1 = g.op("relu", Z1, name="A1")
    Z2 = g.op("linear", A1, W2, b2, name="Z2")
    g.op("softmax_cross_entropy", Z2, y, eps=0.0, name="loss")
    return g


def load_data(seed: int = 0, test_size: float = 0.2, subset: int | None = None, dtype=np.float32):
    """Standardized digits features (train statistics), integer labels, a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    if subset is not None:
        X, y = X[:subset], y[:subset]
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1.0  # constant border pixels
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    return Xtr.astype(dtype), ytr.astype(np.int64), Xte.astype(dtype), yte.astype(np.int64)


def init_params(n_in: int, n_hidden: int, n_out: int, seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "W1": (rng.standard_normal((n_hidden, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype),  # linear: W[out, in], as nn.Linear
        "b1": np.zeros(n_hidden, dtype),
        "W2": (rng.standard_normal((n_out, n_hidden)) * np.sqrt(1.0 / n_hidden)).astype(dtype),
        "b2": np.zeros(n_out, dtype),
    }


class NoTritonDevice(RuntimeError):
    """--target triton cannot run here; the message (one line) says how it could."""


def triton_device(verbose: bool = True) -> str:
    """Where the Triton kernels run: "cuda" when torch sees a GPU; else "cpu" through Triton's
    interpreter, chosen here (TRITON_INTERPRET=1) before anything imports triton, which fixes the
    mode at its first import. Refused when triton was already imported compiled-only, or when
    TRITON_INTERPRET=0 asks for no interpreter."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    flag = os.environ.get("TRITON_INTERPRET", "")
    if flag == "0":
        raise NoTritonDevice("--target triton: no CUDA GPU and TRITON_INTERPRET=0; unset it to run Triton's CPU "
                             "interpreter (slow), or use --target numpy")
    if flag in ("", "0") and "triton" in sys.modules:
        raise NoTritonDevice("--target triton: no CUDA GPU, and triton was imported before TRITON_INTERPRET=1 could be "
                             "set; start Python with TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"
    if verbose:
        print("--target triton: no CUDA GPU, so the Triton kernels run on the CPU through Triton's interpreter "
              "(TRITON_INTERPRET=1): slow, about 2 CPU-seconds a step "
              "and 90 a full epoch; --epochs 1 --subset 400 is a quick look", flush=True)
    return "cpu"


def _to_target(a, target: str, device: str = "cpu"):
    """NumPy arrays for the numpy target; torch tensors on ``device`` for triton."""
    if target == "triton":
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return a


def accuracy(g: Graph, params: dict, X, y, target: str) -> float:
    logits = g.forward({"X": X, "y": y, **params}, target=target)["Z2"]
    return float((logits.argmax(1) == y).sum()) / len(y)


def make_optimizer(name: str, params: dict, lr: float, target: str):
    """The optimizer ``name`` (a key of OPTIMIZERS) over ``params``, updated in place, and a
    function that applies one step given the gradients by name."""
    cls, options, _ = OPTIMIZERS[name]
    if target == "triton":
        import symgrad.optim as optim

        opt = getattr(optim, cls)([params[k] for k in PARAMS], lr=lr, **options)

        def step(grads):
            for k in PARAMS:
                params[k].grad = grads[k]
            opt.step()
    else:
        from symgrad.optim import numpy as optim

        opt = getattr(optim, cls)([params[k] for k in PARAMS], lr=lr, **options)

        def step(grads):
            opt.step([grads[k] for k in PARAMS])
    return opt, step


def make_schedule(name: str, lr: float, total_steps: int, steps_per_epoch: int, target: str):
    """None, or a declared schedule: warmup-cosine warms up over the first epoch and decays to lr/100
    at the last step; step halves the learning rate every 10 epochs."""
    from symgrad.optim import schedules

    if name == "warmup-cosine":
        warmup = min(steps_per_epoch, total_steps - 1)
        return schedules.warmup_cosine(lr, warmup, total_steps, start_factor=0.1, eta_min=lr / 100, target=target)
    if name == "step":
        return schedules.step_decay(lr, 10 * steps_per_epoch, 0.5, target=target)
    return None


def train(
    epochs: int = 30,
    batch: int = 32,
    lr: float | None = None,
    hidden: int = 64,
    seed: int = 0,
    target: str = "numpy",
    subset: int | None = None,
    verbose: bool = True,
    optimizer: str = "sgd",
    schedule: str = "none",
    clip_norm: float | None = None,
) -> dict:
    """Mini-batch training with ``optimizer`` (a key of OPTIMIZERS; ``lr`` None: its own), an
    optional learning-rate schedule and gradient clipping; returns the per-epoch history and the
    final test accuracy."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    lr = OPTIMIZERS[optimizer][2] if lr is None else lr
    device = triton_device(verbose) if target == "triton" else "cpu"
    Xtr, ytr, Xte, yte = load_data(seed, subset=subset)
    params = init_params(Xtr.shape[1], hidden, 10, seed)
    Xtr, ytr, Xte, yte = (_to_target(a, target, device) for a in (Xtr, ytr, Xte, yte))
    params = {k: _to_target(v, target, device) for k, v in params.items()}
    g = build_graph()
    rng = np.random.default_rng(seed + 1)
    n = len(ytr)
    opt, apply_step = make_optimizer(optimizer, params, lr, target)
    sched = make_schedule(schedule, lr, max(epochs * -(-n // batch), 2), -(-n // batch), target)
    history = {"epoch": [], "train_loss": [], "test_acc": [], "step_loss": [], "lr": [],
               "optimizer": optimizer, "schedule": schedule}
    history["initial_test_acc"] = accuracy(g, params, Xte, yte, target)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        total, seen = 0.0, 0
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            if target == "triton":
                import torch

                idx = torch.from_numpy(idx).to(ytr.device)
            loss, grads = g.value_and_grad({"X": Xtr[idx], "y": ytr[idx], **params}, wrt=PARAMS, target=target)
            if clip_norm is not None:
                from symgrad.optim import clip

                if target == "triton":
                    clip.clip_grad_norm_([_Grad(grads[k]) for k in PARAMS], clip_norm)
                else:
                    grads = {k: np.array(v) for k, v in grads.items()}  # clipping writes them in place
                    clip.clip_grad_norm_arrays([grads[k] for k in PARAMS], clip_norm)
            if sched is not None:  # numpy: a float; triton: the schedule's device tensor, never read back
                opt.param_groups[0]["lr"] = sched.lr if target == "triton" else sched.get_last_lr()
                history["lr"].append(sched.get_last_lr() if target == "numpy" else None)
                sched.step()
            apply_step(grads)  # the generated update rule, in place
            loss = float(loss)
            history["step_loss"].append(loss)
            total += loss * len(idx)
            seen += len(idx)
        acc = accuracy(g, params, Xte, yte, target)
        history["epoch"].append(epoch)
        history["train_loss"].append(total / seen)
        history["test_acc"].append(acc)
        if verbose:
            print(f"epoch {epoch:3d}  train loss {total / seen:.4f}  test acc {acc:.4f}", flush=True)
    history["seconds"] = time.perf_counter() - t0
    history["final_test_acc"] = history["test_acc"][-1] if epochs else history["initial_test_acc"]
    history["steps_per_epoch"] = -(-n // batch)
    history["n_train"], history["n_test"], history["hidden"] = n, len(yte), hidden
    history["lr0"] = lr
    return history


class _Grad:
    """What torch's clip_grad_norm_ takes: an object whose ``.grad`` is the gradient."""

    def __init__(self, grad):
        self.grad = grad


def plot_compare(histories: list[dict], path: str) -> None:
    """Loss and test accuracy of several runs (one per optimizer), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for h in histories:
        label = f"{h['optimizer']} (lr {h['lr0']:g}{', ' + h['schedule'] if h['schedule'] != 'none' else ''}): {h['final_test_acc']:.1%}"
        ax.plot(h["epoch"], h["train_loss"], marker="o", ms=2.5, label=label)
        ax2.plot(h["epoch"], np.array(h["test_acc"]) * 100, marker="s", ms=2.5, label=h["optimizer"])
    ax.set(xlabel="epoch", ylabel="train loss (epoch mean)", yscale="log", title="softmax cross-entropy")
    ax2.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(85, 100), title="test accuracy")
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8, loc="lower right")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.suptitle("digits, 64-%d-10 MLP: generated gradients, generated update rules" % histories[0]["hidden"], fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    spe = history["steps_per_epoch"]
    steps = np.arange(1, len(history["step_loss"]) + 1) / spe
    ax.plot(steps, history["step_loss"], color="tab:blue", alpha=0.25, lw=0.8, label="mini-batch loss")
    ax.plot(history["epoch"], history["train_loss"], color="tab:blue", marker="o", ms=3, label="train loss (epoch mean)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("softmax cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(history["epoch"], np.array(history["test_acc"]) * 100, color="tab:orange", marker="s", ms=3, label="test accuracy")
    ax2.axhline(95, color="tab:orange", ls=":", lw=0.8)
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_ylim(80, 100)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left")
    ax.set_title(f"digits, 64-{history['hidden']}-10 MLP, symgrad-generated gradients: final test acc {history['final_test_acc']:.1%}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the optimizer's own, see OPTIMIZERS)")
    ap.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS))
    ap.add_argument("--schedule", default="none", choices=SCHEDULES)
    ap.add_argument("--clip-norm", type=float, default=None, help="clip the gradients to this global L2 norm each step")
    ap.add_argument("--compare", action="store_true", help="train with every optimizer and plot them side by side")
    ap.add_argument("--compare-plot", default="examples/digits_optimizers.png")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", default="numpy", help="numpy (default) or triton (a CUDA GPU; without one, Triton's CPU interpreter, set up here: slow)")
    ap.add_argument("--subset", type=int, default=None, help="use only the first N digits (quick runs)")
    ap.add_argument("--plot", default="examples/digits_loss.png", help="where to save the loss curve PNG")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.compare:
            runs = []
            for name in OPTIMIZERS:
                print(f"--- {name} ---", flush=True)
                runs.append(train(args.epochs, args.batch, args.lr, args.hidden, args.seed, args.target, args.subset,
                                  optimizer=name, schedule=args.schedule, clip_norm=args.clip_norm))
            plot_compare(runs, args.compare_plot)
            for h in runs:
                print(f"{h['optimizer']:9s} lr {h['lr0']:<6g} final test accuracy {h['final_test_acc']:.4f}  "
                      f"final train loss {h['train_loss'][-1]:.4f}  {h['seconds']:.1f} s")
            print(f"{time.perf_counter() - t0:.1f} s total; plot: {args.compare_plot}")
            worst = min(h["final_test_acc"] for h in runs)
        else:
            h = train(args.epochs, args.batch, args.lr, args.hidden, args.seed, args.target, args.subset,
                      optimizer=args.optimizer, schedule=args.schedule, clip_norm=args.clip_norm)
            plot(h, args.plot)
            worst = h["final_test_acc"]
            print(f"final test accuracy {worst:.4f} ({h['n_test']} test digits), {time.perf_counter() - t0:.1f} s total; plot: {args.plot}")
    except NoTritonDevice as e:
        print(f"train_digits: {e}", file=sys.stderr)
        return 2
    if worst < 0.95:
        print(f"FAILED: test accuracy {worst:.4f} < 0.95", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
