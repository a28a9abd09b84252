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
    "mse_sum": lambda X, Y: F.mse_loss(X, Y, reduction="sum"),
    "mse_none": lambda X, Y: F.mse_loss(X, Y, reduction="none"),
    "sigmoid_bce_sum": lambda x, y: F.binary_cross_entropy_with_logits(x, y, reduction="sum"),
    "sigmoid_bce_none": lambda x, y: F.binary_cross_entropy_with_logits(x, y, reduction="none"),
    "matmul": lambda X, W: X @ W,
    "linear": lambda X, W, bias: F.linear(X, W, bias),
    "linear_nobias": lambda X, W: F.linear(X, W),
    "layer_norm": lambda x, w, bias, eps: F.layer_norm(x, x.shape[-1:], w, bias, eps),
    "layer_norm_nobias": lambda x, w, eps: F.layer_norm(x, x.shape[-1:], w, None, eps),
    "layer_norm_noaffine": lambda x, eps: F.layer_norm(x, x.shape[-1:], None, None, eps),
    "rms_norm": lambda x, w, eps, offset=0.0: F.rms_norm(x, x.shape[-1:], w + offset, eps),
    "rms_norm_noaffine": lambda x, eps: F.rms_norm(x, x.shape[-1:], None, eps),
    "conv2d": lambda X, Wt, stride, pad: F.conv2d(X, Wt, stride=stride, padding=pad),
    "grad_norm2": lambda g: torch.linalg.vector_norm(g),
    "grad_norm_inf": lambda g: torch.linalg.vector_norm(g, float("inf"), dim=-1),
    "clip_by_norm": lambda g, total_norm, max_norm: g * torch.clamp(max_norm / (total_norm + 1e-6), max=1.0),
    "clip_by_value": lambda g, clip_value: g.clamp(-clip_value, clip_value),
    "warmup_cosine": lambda t, lr, warmup, cosine_steps, start_factor, eta_min: torch.where(
        t < warmup, lr * (start_factor + (1 - start_factor) * t / warmup),
        eta_min + (lr - eta_min) * (1 + torch.cos(torch.pi * (t - warmup) / cosine_steps)) / 2),
    "step_decay": lambda t, lr, step_size, gamma, warmup, start_factor: torch.where(
        t < warmup, lr * (start_factor + (1 - start_factor) * t / max(warmup, 1)),
        lr * gamma ** torch.floor((t - warmup) / step_size)),
}


def cross_entropy(reduction):
    """F.cross_entropy with the options symgrad's cross-entropy family declares: class weights,
    label smoothing, ignore_index, softcapping of the logits (softcap*tanh(x/softcap): Gemma 2's,
    applied before the loss) and z-loss (Liger's lse_square_scale: z_loss*lse**2 per counted row,
    averaged over the counted rows for 'mean'), which torch has not."""

    def ref(x, y, weight=None, *, eps=0.0, ignore_index=-100, z_loss=0.0, softcap=None):
        z = softcap * torch.tanh(x / softcap) if softcap else x
        loss = F.cross_entropy(z, y, weight=weight, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
        counted = y != ignore_index
        lse2 = torch.where(counted, torch.logsumexp(z, dim=1) ** 2, 0.0)
        zl = {"none": lse2, "sum": lse2.sum(), "mean": lse2.sum() / counted.sum()}[reduction]
        return loss + z_loss * zl

    return ref


for _w in ("", "_weighted"):
    for _c in ("", "_softcap"):
        for _r in ("mean", "sum", "none"):
            REFERENCES[f"softmax_cross_entropy{_w}{_c}" + ("" if _r == "mean" else f"_{_r}")] = cross_entropy(_r)



def z_loss_rows(x, y, *, ignore_index=-100, z_loss=1e-4, softcap=None):
    """The z-loss term alone, per row (Liger's z_loss, returned beside the loss with
    return_z_loss=True): z_loss*logsumexp(x)**2 per counted row, 0 for ignored rows, of the
    softcapped logits where softcap is given."""
    counted = y != ignore_index
    if ((y < 0) | (y >= x.shape[1]))[counted].any():  # labels as F.cross_entropy takes them
        raise IndexError(f"Target {int(y[counted & ((y < 0) | (y >= x.shape[1]))][0])} is out of bounds.")
    z = softcap * torch.tanh(x / softcap) if softcap else x
    return z_loss * torch.where(counted, torch.logsumexp(z, dim=1) ** 2, 0.0)


REFERENCES["softmax_z_loss_none"] = REFERENCES["softmax_z_loss_softcap_none"] = z_loss_rows

# Params to test besides each op's defaults: one dict per extra case.
PARAM_CASES = {
    "leaky_relu": ({"alpha": 0.2},),
    "power": ({"k": 2.5},),
    "softmax_cross_entropy": ({"eps": 0.1}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3}),
    "softmax_cross_entropy_sum": ({"eps": 0.1}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3}),
    "softmax_cross_entropy_none": ({"eps": 0.1}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3}),
    "softmax_cross_entropy_softcap": ({"eps": 0.1, "softcap": 2.0}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3, "softcap": 2.0}),
    "softmax_cross_entropy_softcap_sum": ({"eps": 0.1, "softcap": 2.0}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3, "softcap": 2.0}),
    "softmax_cross_entropy_softcap_none": ({"eps": 0.1, "softcap": 2.0}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3, "softcap": 2.0}),
    "softmax_cross_entropy_weighted": ({"eps": 0.1}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3}),
    "softmax_cross_entropy_weighted_sum": ({"eps": 0.1}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3}),
    "softmax_cross_entropy_weighted_none": ({"eps": 0.1}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3}),
    "softmax_cross_entropy_weighted_softcap": ({"eps": 0.1, "softcap": 2.0}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3, "softcap": 2.0}),
    "softmax_cross_entropy_weighted_softcap_sum": ({"eps": 0.1, "softcap": 2.0}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3, "softcap": 2.0}),
    "softmax_cross_entropy_weighted_softcap_none": ({"eps": 0.1, "softcap": 2.0}, {"eps": 0.05, "ignore_index": 1, "z_loss": 0.01}, {"z_loss": 1e-3, "softcap": 2.0}),
    "softmax_z_loss_none": ({"ignore_index": 1, "z_loss": 0.5},),
    "softmax_z_loss_softcap_none": ({"ignore_index": 1, "z_loss": 0.5, "softcap": 2.0},),
    "layer_norm": ({"eps": 0.1},),
    "clip_by_norm": ({"max_norm": 0.5},),
    "clip_by_value": ({"clip_value": 0.3},),
    "warmup_cosine": ({"warmup": 1, "cosine_steps": 100, "start_factor": 1.0, "eta_min": 0.01},),
    "step_decay": ({"step_size": 3, "gamma": 0.5}, {"warmup": 4, "start_factor": 0.25}),
    "rms_norm": ({"eps": 0.1}, {"offset": 1.0}),
    "layer_norm_nobias": ({"eps": 0.1},),
    "rms_norm_noaffine": ({"eps": 0.1},),
}


def conv2d_padding_skipped(X, Wt, stride, pad):
    """F.conv2d's output with each read of the padding a zero that contributes nothing: torch's
    own CPU forward multiplies the padding's zeros by the filter (0*inf = NaN) in float64 and on
    its float32 im2col path, while its input gradient skips them, as symgrad does everywhere.
    Written with F.unfold and a mask of the reads that fall inside X."""
    n, _, h, w = X.shape
    o, c, r, s = Wt.shape
    cols = F.unfold(X, (r, s), padding=pad, stride=stride)  # [N, C*R*S, L]
    inside = F.unfold(torch.ones((1, c, h, w), dtype=X.dtype), (r, s), padding=pad, stride=stride) > 0
    terms = torch.where(inside[:, None], Wt.reshape(o, -1)[None, :, :, None] * cols[:, None], 0.0)  # [N, O, C*R*S, L]
    ho, wo = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    return terms.sum(2).reshape(n, o, ho, wo)
