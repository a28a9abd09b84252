"""Graphs of registered ops, differentiated by chaining the generated NumPy modules.

Checked against PyTorch autograd of the same network written with torch.nn.functional.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from symgrad.compose import Graph, GraphError

torch = pytest.importorskip("torch")
F = torch.nn.functional
# The triton target runs on CPU through Triton's interpreter; the switch must be set before triton
# is first imported (as tests/test_triton_target.py does).

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-6


def close(actual, expected, rtol=RTOL, atol=1e-12):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


def mlp() -> Graph:
    g = Graph()
    X, y = g.input("X"), g.input("y")
    W1, b1, W2, b2 = g.param("W1"), g.param("b1"), g.param("W2"), g.param("b2")
    a1 = g.op("relu", g.op("linear", X, W1, b1, name="Z1"), name="A1")
    g.op("softmax_cross_entropy", g.op("linear", a1, W2, b2, name="Z2"), y, name="loss")
    return g


def mlp_values(B=7, K=6, H=5, C=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "X": rng.standard_normal((B, K)),
        "y": rng.integers(0, C, B).astype(np.int64),
        "W1": rng.standard_normal((H, K)) / np.sqrt(K),
        "b1": 0.1 * rng.standard_normal(H),
        "W2": rng.standard_normal((C, H)) / np.sqrt(H),
        "b2": 0.1 * rng.standard_normal(C),
    }


def torch_leaves(values, names):
    return {k: torch.tensor(v, requires_grad=k in names) for k, v in values.items()}


def torch_grads(loss, t, names):
    grads = torch.autograd.grad(loss, [t[n] for n in names])
    return dict(zip(names, grads))


# ----------------------------------------------------------------------------- the two-layer network


def test_mlp_matches_torch_autograd():
    g, v = mlp(), mlp_values()
    wrt = ["W1", "b1", "W2", "b2", "X"]
    loss, grads = g.value_and_grad(v, wrt=wrt)

    t = torch_leaves(v, wrt)
    z2 = F.linear(F.relu(F.linear(t["X"], t["W1"], t["b1"])), t["W2"], t["b2"])
    tloss = F.cross_entropy(z2, t["y"])
    close(loss, tloss)
    for name, expected in torch_grads(tloss, t, wrt).items():
        assert grads[name].shape == v[name].shape, name
        close(grads[name], expected)


def test_mlp_forward_returns_every_value():
    g, v = mlp(), mlp_values()
    out = g.forward(v)
    assert set(out) == {"X", "y", "W1", "b1", "W2", "b2", "Z1", "A1", "Z2", "loss"}
    close(out["Z1"], v["X"] @ v["W1"].T + v["b1"])  # linear: W[out, in]
    close(out["A1"], np.maximum(out["Z1"], 0))
    # default wrt: every param
    loss, grads = g.value_and_grad(v)
    assert sorted(grads) == ["W1", "W2", "b1", "b2"]
    close(loss, out["loss"])


def test_mlp_label_smoothing_and_ignored_rows_match_torch():
    g = Graph()
    X, y, W, b = g.input("X"), g.input("y"), g.param("W"), g.param("b")
    g.op("softmax_cross_entropy", g.op("relu", g.op("linear", X, W, b)), y, eps=0.1, ignore_index=-1)
    rng = np.random.default_rng(1)
    v = {"X": rng.standard_normal((6, 5)), "y": np.array([0, 2, -1, 3, 1, -1]), "W": rng.standard_normal((4, 5)), "b": rng.standard_normal(4)}
    loss, grads = g.value_and_grad(v, wrt=["W", "b", "X"])

    t = torch_leaves(v, ["W", "b", "X"])
    tloss = F.cross_entropy(F.relu(F.linear(t["X"], t["W"], t["b"])), t["y"], ignore_index=-1, label_smoothing=0.1)
    close(loss, tloss)
    for name, expected in torch_grads(tloss, t, ["W", "b", "X"]).items():
        close(grads[name], expected)


# ----------------------------------------------------------------------------- gradient accumulation


def test_tensor_used_twice_in_one_node_accumulates():
    g = Graph()
    x = g.input("x")
    g.op("mul", x, x, name="sq")
    g.op("add", x, x, name="dbl")
    rng = np.random.default_rng(2)
    v = {"x": rng.standard_normal((3, 5))}
    dsq, ddbl = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    tape = g.forward_with_saved(v)
    close(tape.values["sq"], v["x"] ** 2)
    grads = g.backward(tape, {"sq": dsq, "dbl": ddbl}, wrt=["x"])

    tx = torch.tensor(v["x"], requires_grad=True)
    (expected,) = torch.autograd.grad([tx * tx, tx + tx], [tx], grad_outputs=[torch.tensor(dsq), torch.tensor(ddbl)])
    close(grads["x"], expected)  # 2*x*dsq + 2*ddbl


def test_weight_tying_and_residual_accumulate_vs_torch():
    """W is read by two linear layers and X by a linear layer and a residual add."""
    g = Graph()
    X, y, W, b1, b2 = g.input("X"), g.input("y"), g.param("W"), g.param("b1"), g.param("b2")
    h = g.op("relu", g.op("linear", X, W, b1))
    r = g.op("add", h, X)  # X used twice
    z = g.op("linear", r, W, b2)  # W used twice
    g.op("softmax_cross_entropy", g.op("mul", z, z), y)  # z used twice in one node
    rng = np.random.default_rng(3)
    D = 5
    v = {"X": rng.standard_normal((4, D)), "y": np.array([0, 4, 2, 2]), "W": rng.standard_normal((D, D)) / np.sqrt(D),
         "b1": rng.standard_normal(D), "b2": rng.standard_normal(D)}
    wrt = ["W", "b1", "b2", "X"]
    loss, grads = g.value_and_grad(v, wrt=wrt)

    t = torch_leaves(v, wrt)
    tz = F.linear(F.relu(F.linear(t["X"], t["W"], t["b1"])) + t["X"], t["W"], t["b2"])
    tloss = F.cross_entropy(tz * tz, t["y"])
    close(loss, tloss)
    for name, expected in torch_grads(tloss, t, wrt).items():
        close(grads[name], expected)


def test_labels_get_no_gradient_and_unreached_names_are_none():
    g = mlp()
    _, grads = g.value_and_grad(mlp_values(), wrt=["y", "W1"])
    assert grads["y"] is None
    assert grads["W1"] is not None


def test_mlp_on_the_triton_target_matches_torch():
    """The same graph code drives the Triton modules on torch tensors (accumulation is plain `+`)."""
    pytest.importorskip("triton")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not interpret and not torch.cuda.is_available():
        pytest.skip("triton target needs a CUDA GPU or TRITON_INTERPRET=1")
    device = "cpu" if interpret else "cuda"
    g = Graph()
    X, y, W, b1, b2 = g.input("X"), g.input("y"), g.param("W"), g.param("b1"), g.param("b2")
    h = g.op("relu", g.op("linear", X, W, b1))
    z = g.op("linear", g.op("add", h, X), W, b2)  # W and X each read twice
    g.op("softmax_cross_entropy", z, y, eps=0.1)
    rng = np.random.default_rng(4)
    v = {"X": rng.standard_normal((5, 6)), "y": np.array([0, 5, 2, 2, 1]), "W": rng.standard_normal((6, 6)) / 3,
         "b1": rng.standard_normal(6), "b2": rng.standard_normal(6)}
    tv = {k: torch.tensor(a, dtype=torch.float32 if a.dtype.kind == "f" else torch.int64, device=device) for k, a in v.items()}
    wrt = ["W", "b1", "b2", "X"]
    loss, grads = g.value_and_grad(tv, wrt=wrt, target="triton")
    assert isinstance(grads["W"], torch.Tensor) and grads["W"].device.type == device

    t = torch_leaves(v, wrt)
    tz = F.linear(F.relu(F.linear(t["X"], t["W"], t["b1"])) + t["X"], t["W"], t["b2"])
    tloss = F.cross_entropy(tz, t["y"], label_smoothing=0.1)
    close(float(loss), tloss, rtol=1e-5, atol=1e-6)
    for name, expected in torch_grads(tloss, t, wrt).items():
        close(grads[name].cpu().numpy(), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_unknown_op_names_the_registry():
    g = Graph()
    x = g.input("x")
    with pytest.raises(GraphError, match=r"unknown op 'relux'.*relu.*symgrad list"):
        g.op("relux", x)


def test_wrong_number_of_inputs():
    g = Graph()
    X, W = g.input("X"), g.param("W")
    with pytest.raises(GraphError, match=r"'linear' takes 3 input\(s\) \(X, W, bias\), got 2"):
        g.op("linear", X, W)


def test_unknown_params():
    g = Graph()
    x, y = g.input("x"), g.input("y")
    with pytest.raises(GraphError, match=r"no param\(s\) epsilon; it accepts: eps, ignore_index"):
        g.op("softmax_cross_entropy", x, y, epsilon=0.1)
    with pytest.raises(GraphError, match=r"'relu' has no param\(s\) alpha; it accepts: none"):
        g.op("relu", x, alpha=0.1)


def test_inputs_must_be_values_of_this_graph():
    g, other = Graph(), Graph()
    with pytest.raises(GraphError, match="must be a graph Value"):
        g.op("relu", np.zeros((2, 2)))
    with pytest.raises(GraphError, match="belongs to another graph"):
        g.op("relu", other.input("x"))


def test_duplicate_names_and_unknown_target():
    g = Graph()
    g.input("x")
    with pytest.raises(GraphError, match="'x' is used twice"):
        g.param("x")
    g.op("relu", g.values["x"], name="r")
    with pytest.raises(GraphError, match="unknown target 'cuda'"):
        g.forward({"x": np.ones((2, 2))}, target="cuda")


def test_missing_and_unknown_values():
    g, v = mlp(), mlp_values()
    with pytest.raises(GraphError, match=r"missing value\(s\) for W2, b2"):
        g.forward({k: v[k] for k in ("X", "y", "W1", "b1")})
    with pytest.raises(GraphError, match=r"unknown value name\(s\) 'W3'"):
        g.forward({**v, "W3": v["W2"]})
    with pytest.raises(GraphError, match="Z1 are computed by the graph"):
        g.forward({**v, "Z1": np.zeros(1)})
    with pytest.raises(GraphError, match="no value named 'W9'"):
        g.value_and_grad(v, wrt=["W9"])


# ----------------------------------------------------------------------------- a short training run


def test_short_training_run_improves_accuracy():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples" / "train_digits.py")
    td = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(td)
    h = td.train(epochs=3, subset=600, verbose=False)
    assert len(h["train_loss"]) == 3
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert h["final_test_acc"] >= h["initial_test_acc"] + 0.3
    assert h["final_test_acc"] >= 0.85
