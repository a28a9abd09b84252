"""Reads outside a tensor, for the generated NumPy modules: zero-extension gathers, and the
contractions where such a zero contributes nothing.

A convolution reads ``X[n, c, h*stride + r - pad, ...]`` past ``X``'s edges (the zero padding), its
input gradient reads ``dY`` where a stride leaves gaps; a label of -100 picks no logit. Those reads
give 0. In a sum of products the 0 then meets the other factors, and ``0*inf`` is NaN: a padding
read would turn one inf in a filter into NaN in every output whose window overhangs the edge, where
torch's input gradient (and the mathematics of zero padding) has that product contribute nothing.
:func:`contract` is an einsum that keeps it so.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

ALL = slice(None)  # a gather position read whole (a plain index over the tensor's extent)


def gather(t: np.ndarray, *index) -> np.ndarray:
    """``t[index]``, where reads outside ``t``'s extent give 0: the zero-extension convention (a
    convolution's zero padding, ignored labels).

    Each entry of ``index`` is :data:`ALL` (keep that axis) or an integer array; the arrays
    broadcast together, and the result lays out axes as NumPy indexing does (the broadcast block
    in place of the array positions when they are adjacent, else first). Small overhangs (a
    convolution's padding) are served by zero-padding ``t``; large ones (a label of -100) by a mask.
    """
    empty = [k for k, ix in enumerate(index) if not isinstance(ix, slice) and t.shape[k] == 0]
    if empty:
        # every read along an empty axis falls outside it (a conv2d input of height 0, padded):
        # reads of one zero entry there, in the shape the reads give
        t = np.zeros([1 if k in empty else n for k, n in enumerate(t.shape)], dtype=t.dtype)
        index = tuple(np.zeros_like(np.asarray(ix)) if k in empty else ix for k, ix in enumerate(index))
    arrays = [(k, np.asarray(ix)) for k, ix in enumerate(index) if not isinstance(ix, slice)]
    pads = [(0, 0)] * t.ndim
    shifted = list(index)
    for k, ix in arrays:
        n = t.shape[k]
        lo, hi = (int(ix.min()), int(ix.max())) if ix.size else (0, 0)
        below, above = max(0, -lo), max(0, hi - (n - 1))
        pads[k] = (below, above)
        shifted[k] = ix + below if below else ix
    block = np.broadcast_shapes(*(ix.shape for _, ix in arrays))
    result = int(np.prod(block)) * int(np.prod([t.shape[k] for k, ix in enumerate(index) if isinstance(ix, slice)]))
    padded = int(np.prod([n + a + b for n, (a, b) in zip(t.shape, pads)]))
    # Padding copies the tensor once: worth it when the result is at least that big (im2col), not
    # for a few reads far outside (a label of -100 picking one logit per row).
    if padded <= max(result, t.size) or all(p == (0, 0) for p in pads):
        if any(p != (0, 0) for p in pads):
            t = np.pad(t, pads)
        return t[tuple(shifted)]
    clipped = list(index)
    for k, ix in arrays:
        clipped[k] = np.clip(ix, 0, t.shape[k] - 1)
    values = t[tuple(clipped)]
    return np.where(_inside(t.shape, index, values.ndim), values, 0)


def _inside(shape, index, ndim: int) -> np.ndarray:
    """Which reads of ``t[index]`` (``t`` of ``shape``) fall inside ``t``: a boolean array over the
    index arrays' broadcast block, placed where NumPy indexing puts the block in a result of
    ``ndim`` axes, with length-1 axes elsewhere (it broadcasts against the gathered values)."""
    arrays = [(k, np.asarray(ix)) for k, ix in enumerate(index) if not isinstance(ix, slice)]
    ok = np.ones(np.broadcast_shapes(*(ix.shape for _, ix in arrays)), dtype=bool)
    for k, ix in arrays:
        ok = ok & (ix >= 0) & (ix < shape[k])
    positions = [k for k, _ in arrays]
    if positions == list(range(positions[0], positions[0] + len(positions))):
        before = sum(1 for k in range(positions[0]) if isinstance(index[k], slice))
    else:
        before = 0
    return np.reshape(ok, (1,) * before + ok.shape + (1,) * (ndim - before - ok.ndim))


class Reads(NamedTuple):
    """A gather and where it read inside its tensor (``inside``: broadcasts against ``values``;
    None when every read was inside)."""
    values: np.ndarray
    inside: np.ndarray | None


def reads(t: np.ndarray, *index) -> Reads:
    """:func:`gather`, keeping which reads fell inside ``t``: an operand of :func:`contract`."""
    values = gather(t, *index)
    inside = _inside(t.shape, index, values.ndim)
    return Reads(values, None if inside.all() else inside)


def contract(subscripts: str, *operands, optimize=True) -> np.ndarray:
    """``np.einsum(subscripts, ...)`` where the operands may be :class:`Reads`: a term holding a
    read outside its tensor contributes nothing, whatever the other factors hold (``0*inf`` and
    ``0*nan`` would be NaN).

    Only a non-finite entry in another operand can tell the two apart, so that is checked first
    (an operand as large as the output at most: a filter, a conv's ``dY``); when one holds inf or
    NaN the sum is formed again with the outside terms left out (:func:`_skipping_outside`)."""
    values = [o.values if isinstance(o, Reads) else o for o in operands]
    out = np.einsum(subscripts, *values, optimize=optimize)
    masked = [k for k, o in enumerate(operands) if isinstance(o, Reads) and o.inside is not None]
    others = sorted({j for k in masked for j in range(len(operands)) if j != k})
    if all(np.isfinite(values[j]).all() for j in others):
        return out
    return _skipping_outside(subscripts, values, [operands[k].inside if k in masked else None for k in range(len(operands))], out)


_ONE_SHOT = 1 << 24  # entries of the masked product formed at once (64 MB of float32)


def _skipping_outside(subscripts, values, insides, like) -> np.ndarray:
    """The einsum with every term that reads outside left out. A read's inside-mask varies along
    a few axes only (a conv's ``h, r, w, s``, never its channels): the einsum keeps the summed ones
    among them as axes, the mask zeroes the outside terms, and a sum over those axes finishes.
    Where that array would be large, the summed mask axes are a Python loop instead."""
    ins, out_s = subscripts.split("->")
    ins = ins.split(",")
    size = {}
    for s, v in zip(ins, values):
        size.update(zip(s, v.shape))
    varying = [(s, m) for s, m in zip(ins, insides) if m is not None]
    if any(len(set(s)) != len(s) for s, _ in varying):
        raise ValueError(f"contract: a gathered operand with a repeated index ({subscripts})")
    loop = "".join(c for c in dict.fromkeys(c for s, m in varying for c, n in zip(s, m.shape) if n != 1) if c not in out_s)
    if int(np.prod([size[c] for c in out_s + loop])) <= _ONE_SHOT:
        part = np.einsum(",".join(ins) + "->" + out_s + loop, *values, optimize=True)
        kept = np.where(_mask(varying, {}, out_s + loop, size), part, 0)
        return kept.sum(axis=tuple(range(len(out_s), len(out_s) + len(loop)))).astype(like.dtype, copy=False)
    acc = np.zeros(like.shape, dtype=like.dtype)
    for at in itertools.product(*(range(size[c]) for c in loop)):
        fixed = dict(zip(loop, at))
        subs, vals = [], []
        for s, v in zip(ins, values):
            subs.append("".join(c for c in s if c not in fixed))
            vals.append(v[tuple(fixed.get(c, slice(None)) for c in s)])
        part = np.einsum(",".join(subs) + "->" + out_s, *vals, optimize=True)
        acc += np.where(_mask(varying, fixed, out_s, size), part, 0)
    return acc


def _mask(varying, fixed: dict, axes: str, size: dict) -> np.ndarray:
    """Where every masked operand reads inside, over ``axes`` (length 1 where no mask varies),
    with the letters in ``fixed`` at their positions."""
    keep = np.ones((1,) * len(axes), dtype=bool)
    for s, m in varying:
        idx, letters = [], []
        for a, c in enumerate(s):
            if m.shape[a] == 1:
                idx.append(0)
            elif c in fixed:
                idx.append(fixed[c])
            else:
                idx.append(slice(None))
                letters.append(c)
        m = np.transpose(m[tuple(idx)], [letters.index(c) for c in axes if c in letters])
        keep = keep & m.reshape([size[c] if c in letters else 1 for c in axes])
    return keep
