"""Smoke tests of the training examples (examples/train_digits.py, linear_regression.py,
gradient_flow.py) at small settings: each asserts what the example teaches."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_linear_regression_first_gradient_is_the_hand_computation(capsys):
    lr = _example("linear_regression")
    assert lr.main(["--epochs", "15"]) == 0  # main asserts the generated gradient against the hand one
    out = capsys.readouterr().out
    assert "dW[2]  generated" in out and "largest difference" in out  # printed beside each other
    h = lr.train(epochs=15, verbose=False)
    for k in ("W", "b"):
        np.testing.assert_allclose(h["first_gradient"][k], h["hand_gradient"][k], rtol=1e-12, atol=1e-14)
    # a hand gradient worked independently of the example's helper: 2/B X^T (X W - y) at W = 0, b = 0
    X, y, w_true, b_true = lr.make_data(seed=0)
    idx = np.random.default_rng(1).permutation(len(y))[:16]
    np.testing.assert_allclose(h["first_gradient"]["W"], -2.0 / 16 * X[idx].T @ y[idx], rtol=1e-12)
    np.testing.assert_allclose(h["W"], w_true, atol=0.05)  # SGD finds the weights (noise 0.1)
    assert abs(h["b"][0] - b_true[0]) < 0.05
    assert h["epoch_loss"][-1] < 0.02 < h["epoch_loss"][0]


def test_gradient_flow_shows_vanishing_and_exploding_gradients(tmp_path):
    gf = _example("gradient_flow")
    out = gf.run(steps=8, max_norm=1.0, verbose=False)
    assert out["sigmoid"][0] < 1e-6 * out["relu"][0]  # sigmoid's first layer gets almost nothing
    assert out["sigmoid"][0] < 1e-6 * out["sigmoid"][-1]
    assert out["relu"].max() < 10 * out["relu"].min()  # ReLU with He init: the same order everywhere
    assert out["total_before"] > 1e3  # exploding
    assert out["total_after"] == pytest.approx(1.0, rel=1e-5)  # clipped to max_norm (less torch's 1e-6)
    np.testing.assert_allclose(out["clipped"] / out["exploding"], out["total_after"] / out["total_before"], rtol=1e-9)
    u, c = out["loss_unclipped"], out["loss_clipped"]
    assert not np.isfinite(u[-1]) or u[-1] > 1e6 * c[-1]  # without clipping SGD diverges
    assert np.all(np.isfinite(c)) and c[-1] < c[0]  # with clipping it trains
    gf.plot(out, str(tmp_path / "flow.png"))
    assert (tmp_path / "flow.png").stat().st_size > 10_000


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw"])
def test_train_digits_optimizers_with_warmup_cosine(optimizer):
    pytest.importorskip("sklearn")
    td = _example("train_digits")
    h = td.train(epochs=3, verbose=False, optimizer=optimizer, schedule="warmup-cosine")
    assert h["train_loss"][-1] < 0.5 * h["train_loss"][0]
    assert h["final_test_acc"] >= 0.88  # 93%, 94% and 91% after 3 epochs of the full set
    lrs = np.array(h["lr"])  # the schedule's value at each step: warmup over epoch 1, then cosine to lr/100
    spe, lr0 = h["steps_per_epoch"], h["lr0"]
    assert len(lrs) == 3 * spe and lrs[0] == pytest.approx(0.1 * lr0) and lrs.argmax() == spe
    assert lrs[spe] == pytest.approx(lr0) and lr0 / 100 < lrs[-1] < lr0 / 50  # one step before the floor


def test_train_digits_compare_writes_one_plot(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    td = _example("train_digits")
    path = tmp_path / "optimizers.png"
    assert td.main(["--compare", "--epochs", "10", "--clip-norm", "5", "--compare-plot", str(path), "--plot", str(tmp_path / "x.png")]) == 0
    assert path.stat().st_size > 10_000


def test_train_digits_refuses_unknown_choices():
    td = _example("train_digits")
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        td.train(epochs=1, subset=100, optimizer="adam")
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        td.train(epochs=1, subset=100, schedule="cosine")
