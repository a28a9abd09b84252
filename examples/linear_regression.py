"""Mini-batch SGD linear regression from generated code, with its first gradient checked by hand.

    pred = X W + b           (generated matmul and bias_add)
    loss = mean((pred - y)**2)   (generated mse_mean)

The gradient of the loss over a batch of B rows, written by hand, is

    r = pred - y,   dW = (2/B) X^T r,   db = (2/B) sum_b r[b]

The script prints the generated gradient of the first batch beside that hand computation and stops
if they differ, then trains with mini-batch SGD (symgrad.optim.numpy.SGD, whose update is the
generated ``sgd`` rule) and prints the weights it finds beside the true ones.

    python examples/linear_regression.py [--epochs 20] [--batch 16] [--lr 0.05]

NumPy only; runs in about a second.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from symgrad.compose import Graph
from symgrad.optim.numpy import SGD

PARAMS = ("W", "b")


def build_graph() -> Graph:
    g = Graph()
    X, y = g.input("X"), g.input("y")
    W, b = g.param("W"), g.param("b")
    pred = g.op("bias_add", g.op("matmul", X, W, name="XW"), b, name="pred")
    g.op("mse_mean", pred, y, name="loss")
    return g


def make_data(n: int = 256, features: int = 3, noise: float = 0.1, seed: int = 0):
    """y = X w_true + b_true + noise, X standard normal; float64 so the hand check is exact."""
    rng = np.random.default_rng(seed)
    w_true = rng.uniform(-2.0, 2.0, size=(features, 1))
    b_true = np.array([0.5])
    X = rng.standard_normal((n, features))
    y = X @ w_true + b_true + noise * rng.standard_normal((n, 1))
    return X, y, w_true, b_true


def hand_gradient(X, y, W, b):
    """The gradient of mean((X W + b - y)**2) over a batch, derived by hand."""
    r = X @ W + b - y
    B = X.shape[0]
    return {"W": 2.0 / B * X.T @ r, "b": 2.0 / B * r.sum(axis=0)}


def train(epochs: int = 20, batch: int = 16, lr: float = 0.05, seed: int = 0, verbose: bool = True) -> dict:
    X, y, w_true, b_true = make_data(seed=seed)
    params = {"W": np.zeros((X.shape[1], 1)), "b": np.zeros(1)}
    g = build_graph()
    opt = SGD([params[k] for k in PARAMS], lr=lr)  # updates the arrays in place
    rng = np.random.default_rng(seed + 1)
    history = {"epoch_loss": []}
    order = rng.permutation(len(y))
    for epoch in range(1, epochs + 1):
        total = 0.0
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            feed = {"X": X[idx], "y": y[idx], **params}
            loss, grads = g.value_and_grad(feed, wrt=PARAMS)
            if "first_gradient" not in history:
                history["first_gradient"] = {k: np.array(v) for k, v in grads.items()}
                history["hand_gradient"] = hand_gradient(X[idx], y[idx], params["W"], params["b"])
            opt.step([grads[k] for k in PARAMS])
            total += float(loss) * len(idx)
        history["epoch_loss"].append(total / len(y))
        if verbose:
            print(f"epoch {epoch:3d}  mean squared error {total / len(y):.5f}")
        order = rng.permutation(len(y))
    history.update(W=params["W"], b=params["b"], w_true=w_true, b_true=b_true)
    return history


def show_first_gradient(h: dict) -> float:
    """Print the generated and the hand gradient side by side; return their largest difference."""
    print("first batch's gradient: generated (matmul + bias_add + mse_mean vjp)  vs  hand (2/B) X^T r, (2/B) sum r")
    worst = 0.0
    for k in PARAMS:
        gen, hand = h["first_gradient"][k].reshape(-1), h["hand_gradient"][k].reshape(-1)
        for j, (a, c) in enumerate(zip(gen, hand)):
            print(f"  d{k}[{j}]  generated {a: .12f}   hand {c: .12f}")
        worst = max(worst, float(np.max(np.abs(gen - hand))))
    print(f"  largest difference {worst:.2e}")
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    h = train(args.epochs, args.batch, args.lr, args.seed)
    worst = show_first_gradient(h)
    if not np.allclose(h["first_gradient"]["W"], h["hand_gradient"]["W"], rtol=1e-12, atol=1e-14) or \
            not np.allclose(h["first_gradient"]["b"], h["hand_gradient"]["b"], rtol=1e-12, atol=1e-14):
        print(f"FAILED: the generated gradient differs from the hand computation by {worst:.2e}", file=sys.stderr)
        return 1
    print("weights found by SGD  vs  true:")
    for j, (a, c) in enumerate(zip(h["W"].reshape(-1), h["w_true"].reshape(-1))):
        print(f"  W[{j}]  {a: .4f}   {c: .4f}")
    print(f"  b     {h['b'][0]: .4f}   {h['b_true'][0]: .4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
