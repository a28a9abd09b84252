"""Every registered op's forward, written independently in PyTorch: what generated code is tested
against (with ``torch.autograd`` for the gradients).

``REFERENCES[op](*inputs, **params)``: inputs as torch tensors in the op's declaration order
(labels as int64), params by name (all of the op's params are passed). One line per op; an op
without a line here is reported by the tests, not skipped.
"""
import torch
import torch.nn.functional as F

REFERENCES = {
    "relu": lambda x: F.relu(x),
    "leaky_relu": lambda x, alpha: F.leaky_relu(x, alpha),
    "sigmoid": lambda x: torch.sigmoid(x),
    "tanh": lambda x: torch.tanh(x),
    "exp": lambda x: torch.exp(x),
    "log": lambda x: torch.log(x),
    "power": lambda x, k: x**k,
    "softplus": lambda x: F.softplus(x),  # torch returns x itself above x = 20; test domains stay below
    "silu": lambda x: F.silu(x),
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "mul": lambda p, q: p * q,
    "add": lambda p, q: p + q,
    "bias_add": lambda x, bias: x + bias,
    "swiglu": lambda a, g: F.silu(a) * g,
    "sum": lambda x: x.sum(dim=1),
    "mean": lambda x: x.mean(dim=1),
    "max": lambda x: torch.amax(x, dim=1),  # ties split the gradient evenly, as the declaration says
    "softmax": lambda x: torch.softmax(x, dim=1),
    "log_softmax": lambda x: torch.log_softmax(x, dim=1),
    "mse": lambda X, Y: ((X - Y) ** 2).sum() / 2,
    "mse_mean": lambda X, Y: F.mse_loss(X, Y),
    "sigmoid_bce": lambda x, y: F.binary_cross_entropy_with_logits(x, y),
    "softmax_cross_entropy": lambda x, y, eps, ignore_index: F.cross_entropy(x, y, ignore_index=ignore_index, label_smoothing=eps),
    "matmul": lambda X, W: X @ W,
    "linear": lambda X, W, bias: F.linear(X, W, bias),
    "linear_nobias": lambda X, W: F.linear(X, W),
    "layer_norm": lambda x, w, bias, eps: F.layer_norm(x, x.shape[-1:], w, bias, eps),
    "layer_norm_nobias": lambda x, w, eps: F.layer_norm(x, x.shape[-1:], w, None, eps),
    "layer_norm_noaffine": lambda x, eps: F.layer_norm(x, x.shape[-1:], None, None, eps),
    "rms_norm": lambda x, w, eps, offset: F.rms_norm(x, x.shape[-1:], w + offset, eps),
    "rms_norm_noaffine": lambda x, eps: F.rms_norm(x, x.shape[-1:], None, eps),
    "conv2d": lambda X, Wt, stride, pad: F.conv2d(X, Wt, stride=stride, padding=pad),
}

# Params to test besides each op's defaults: one dict per extra case.
PARAM_CASES = {
    "leaky_relu": ({"alpha": 0.2},),
    "power": ({"k": 2.5},),
    "softmax_cross_entropy": ({"eps": 0.1}, {"eps": 0.05, "ignore_index": 1}),
    "layer_norm": ({"eps": 0.1},),
    "rms_norm": ({"eps": 0.1}, {"offset": 1.0}),
    "layer_norm_nobias": ({"eps": 0.1},),
    "rms_norm_noaffine": ({"eps": 0.1},),
}
