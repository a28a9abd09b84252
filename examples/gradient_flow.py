"""Vanishing and exploding gradients in a 20-layer MLP, from generated code only.

    Z_l = A_{l-1} W_l + b_l,  A_l = act(Z_l)  (l = 1..19),  Z_20 = A_19 W_20 + b_20,  loss = cross-entropy(Z_20, y)

1. Vanishing: with sigmoid (Xavier init) the gradient of each layer's weights shrinks about 4
   times per layer going back from the loss (sigmoid' <= 1/4): the first layer's is ~1e-12 of the
   last's. With ReLU (He init) every layer's norm stays within a factor of 3 of the others.
2. Exploding: ReLU with weights 1.5 times He's scale grows activations and gradients ~1.5 times
   per layer: at init the loss is ~3e3 and the global gradient norm ~2e4, and plain SGD overflows
   within a few steps. Clipping by global norm (symgrad.optim.clip: the generated ``grad_norm2``
   and ``clip_by_norm``) rescales every layer by one factor, so the total is max_norm and the
   profile across layers is kept; SGD with clipping trains.

Every forward, backward, clip and update step runs a generated NumPy module.

    python examples/gradient_flow.py [--plot examples/gradient_flow.png] [--steps 60]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from symgrad.compose import Graph
from symgrad.optim.clip import clip_grad_norm_arrays
from symgrad.optim.numpy import SGD

LAYERS, WIDTH, CLASSES = 20, 32, 10


def build_graph(activation: str, layers: int = LAYERS) -> Graph:
    g = Graph()
    a, y = g.input("X"), g.input("y")
    for l in range(1, layers + 1):
        z = g.op("bias_add", g.op("matmul", a, g.param(f"W{l}"), name=f"XW{l}"), g.param(f"b{l}"), name=f"Z{l}")
        a = g.op(activation, z, name=f"A{l}") if l < layers else z
    g.op("softmax_cross_entropy", a, y, eps=0.0, name="loss")
    return g


def init_params(activation: str, gain: float = 1.0, layers: int = LAYERS, seed: int = 0) -> dict:
    """Xavier (variance 1/fan_in) for sigmoid, He (2/fan_in) for ReLU, times ``gain``."""
    rng = np.random.default_rng(seed)
    scale = gain * np.sqrt((2.0 if activation == "relu" else 1.0) / WIDTH)
    params = {}
    for l in range(1, layers + 1):
        n_out = CLASSES if l == layers else WIDTH
        params[f"W{l}"] = rng.standard_normal((WIDTH, n_out)) * scale
        params[f"b{l}"] = np.zeros(n_out)
    return params


def make_data(n: int = 256, seed: int = 0):
    """Inputs of 32 features; the label is the argmax of a fixed random projection (learnable)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, WIDTH))
    y = np.argmax(X @ rng.standard_normal((WIDTH, CLASSES)), axis=1).astype(np.int64)
    return X, y


def weight_names(layers: int = LAYERS) -> list[str]:
    return [f"W{l}" for l in range(1, layers + 1)]


def layer_norms(activation: str, gain: float = 1.0, layers: int = LAYERS, seed: int = 0):
    """The gradient of each layer's weights (at initialization, one batch) and their L2 norms."""
    X, y = make_data(seed=seed)
    params = init_params(activation, gain, layers, seed)
    _, grads = build_graph(activation, layers).value_and_grad({"X": X, "y": y, **params}, wrt=weight_names(layers))
    grads = {k: np.array(v) for k, v in grads.items()}
    return grads, np.array([np.linalg.norm(grads[k]) for k in weight_names(layers)])


def train(activation: str, gain: float, max_norm: float | None, steps: int, lr: float = 0.05, seed: int = 0) -> list[float]:
    """SGD on full batches; clip by global norm first when ``max_norm`` is given. The loss per step."""
    X, y = make_data(seed=seed)
    params = init_params(activation, gain, seed=seed)
    g = build_graph(activation)
    names = list(params)
    opt = SGD([params[k] for k in names], lr=lr)
    losses = []
    with np.errstate(all="ignore"):
        for _ in range(steps):
            loss, grads = g.value_and_grad({"X": X, "y": y, **params}, wrt=names)
            losses.append(float(loss))
            if not np.isfinite(losses[-1]):
                break
            grads = [np.array(grads[k]) for k in names]
            if max_norm is not None:
                clip_grad_norm_arrays(grads, max_norm)
            opt.step(grads)
    return losses


def run(steps: int = 60, max_norm: float = 1.0, verbose: bool = True) -> dict:
    out = {}
    out["sigmoid"] = layer_norms("sigmoid")[1]
    out["relu"] = layer_norms("relu")[1]
    grads, out["exploding"] = layer_norms("relu", gain=1.5)
    clipped = [grads[k].copy() for k in weight_names()]
    out["total_before"] = float(clip_grad_norm_arrays(clipped, max_norm))
    out["clipped"] = np.array([np.linalg.norm(c) for c in clipped])
    out["total_after"] = float(np.sqrt(np.sum(out["clipped"] ** 2)))
    out["loss_unclipped"] = train("relu", 1.5, None, steps)
    out["loss_clipped"] = train("relu", 1.5, max_norm, steps)
    out["max_norm"] = max_norm
    if verbose:
        print("layer  |dW| sigmoid   |dW| relu   |dW| relu x1.5   clipped to global norm", max_norm)
        for l in range(LAYERS):
            print(f"{l + 1:5d}  {out['sigmoid'][l]:11.3e}  {out['relu'][l]:10.3e}  {out['exploding'][l]:13.3e}  {out['clipped'][l]:10.3e}")
        print(f"first/last layer: sigmoid {out['sigmoid'][0] / out['sigmoid'][-1]:.1e}, relu {out['relu'][0] / out['relu'][-1]:.2f}, "
              f"relu x1.5 {out['exploding'][0] / out['exploding'][-1]:.1e}")
        print(f"global norm {out['total_before']:.3e} clipped to {out['total_after']:.6f}")
        u, c = out["loss_unclipped"], out["loss_clipped"]
        print(f"SGD lr 0.05, {steps} steps: without clipping loss {u[0]:.3f} -> {u[-1]:.3g} ({len(u)} steps"
              f"{', stopped: not finite' if not np.isfinite(u[-1]) else ''}); with clipping {c[0]:.3f} -> {c[-1]:.3f}")
    return out


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    layers = np.arange(1, LAYERS + 1)
    ax = axes[0]
    ax.semilogy(layers, out["sigmoid"], "o-", ms=3, label="sigmoid (Xavier init)")
    ax.semilogy(layers, out["relu"], "s-", ms=3, label="ReLU (He init)")
    ax.set(xlabel="layer (1 = next to the input)", ylabel="|dL/dW| at init", title="vanishing gradients")
    ax.legend()
    ax = axes[1]
    ax.semilogy(layers, out["exploding"], "o-", ms=3, color="tab:red", label="ReLU, 1.5 x He init")
    ax.semilogy(layers, out["clipped"], "s-", ms=3, color="tab:green", label=f"clipped to global norm {out['max_norm']:g}")
    ax.set(xlabel="layer", ylabel="|dL/dW| at init", title="exploding gradients")
    ax.legend()
    ax = axes[2]
    u = np.array(out["loss_unclipped"])
    ax.semilogy(np.arange(len(u)), np.where(np.isfinite(u), u, np.nan), color="tab:red", label="SGD, no clipping")
    ax.semilogy(np.arange(len(out["loss_clipped"])), out["loss_clipped"], color="tab:green", label="SGD, clip_grad_norm_")
    top = 1e3 * max(out["loss_clipped"])  # the unclipped run leaves any useful scale within a few steps
    ax.set_ylim(0.3 * min(out["loss_clipped"]), top)
    gone = int(np.argmax(~np.isfinite(u) | (u > top))) if np.any(~np.isfinite(u) | (u > top)) else None
    if gone is not None:
        ax.annotate(f"no clipping: {u[gone]:.1e} at step {gone}", (gone, top), xytext=(gone + 5, top / 30),
                    arrowprops={"arrowstyle": "->"}, fontsize=8)
    ax.set(xlabel="step", ylabel="cross-entropy", title="training the 1.5 x He network")
    ax.legend()
    for a in axes:
        a.grid(alpha=0.3)
        a.title.set_fontsize(10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="SGD steps of the with/without clipping runs")
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--plot", default="examples/gradient_flow.png", help="where to save the figure (PNG)")
    args = ap.parse_args(argv)
    out = run(args.steps, args.max_norm)
    plot(out, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
