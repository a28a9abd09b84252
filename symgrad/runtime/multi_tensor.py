"""Host glue of the generated multi-tensor kernels: the tables of a launch over many tensors.

Three kinds of generated kernel share it (:mod:`symgrad.targets.triton_multi`): an update rule's
``_update`` (writes over its inputs), an op's ``_multi_map`` (writes each output of each tensor)
and an op's ``_multi_reduce`` (writes the op's value over each span of each tensor: stage one of a
two-stage reduction; stage two is the same kernel over those values, one program). A launch
covers many tensors of different sizes at once. Its tables live on the device:

``addresses``     int64 ``[K, T]``: row k holds the base address of the k-th tensor (the kernel's
                  inputs, then its outputs; with master weights, a last row of the bf16/fp16
                  parameters) for each of the T tensors; a kernel bitcasts an entry to a pointer
                  of that row's dtype;
``sizes``         int64 ``[T]``: entries of each tensor;
``block_tensor``  int32 ``[programs]`` and ``block_start`` int64 ``[programs]``: which tensor each
                  program works on and its first entry; no copy of any tensor is made.

Tensors whose dtypes differ go to separate launches, one per combination of dtypes, as torch's
``foreach`` kernels group them. The tables depend only on the tensors' addresses and sizes, which
an optimizer (and a training loop's gradients) keep from step to step, so they are built once
and cached (the cache holds the tensors, so an address cannot be reused by another tensor while
its entry lives); a new entry is copied to the device without waiting for it (pinned memory).
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import torch
import triton.language as tl

from .domains import check_params  # noqa: F401  (the generated modules check their params with it)
from .triton_support import check_device, interpreting

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64
#: A reduction's stage one leaves at most about this many partial values (plus one per tensor):
#: each program loops over a span of its tensor, so stage two reads a few KB in one program.
MAX_PARTS = 4096


@dataclass
class Launch:
    addresses: torch.Tensor
    sizes: torch.Tensor
    block_tensor: torch.Tensor
    block_start: torch.Tensor
    count: int  # T, the tensors of this launch
    blocks: int  # programs
    block: int  # BLOCK: entries a program handles at once
    span: int  # entries per program (a multiple of block: a reduction's program loops over it)
    dtypes: tuple  # one tl dtype per address row (the kernel's *_DTYPE constexprs)
    device: torch.device
    index: tuple  # the positions of this launch's tensors in the caller's lists
    positions: torch.Tensor | None = None  # ``index`` on the device (to gather per-tensor scalars)
    master: bool = False
    low_dtype: object = None
    first: int = 0  # a reduction: where this launch's partial values start
    aligned: bool = False  # every address 16-byte aligned and every span a multiple of 16 entries
    keep: tuple = ()  # the tensors the addresses point into, and the pinned staging copies


def block_size(total_max: int) -> int:
    if interpreting():
        return 64  # the interpreter runs a block as NumPy arrays: small blocks, few entries wasted
    return 1024 if total_max >= 1024 else max(16, 1 << (max(total_max, 1) - 1).bit_length())


def bind_params(op: str, defaults: dict, given: dict) -> tuple:
    """The params' values in declaration order, as floats; an unknown name is a TypeError."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TypeError(f"{op}: unknown param {unknown[0]!r}; params are {sorted(defaults)}")
    return tuple(float(given.get(k, v)) for k, v in defaults.items())


def _to_device(values, dtype, device, keep: list) -> torch.Tensor:
    """A table on ``device``, copied from pinned host memory without a host sync on a GPU (torch's
    pinned allocator keeps the host copy until the device has read it; ``keep`` holds it too)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    host = host.pin_memory()
    keep.append(host)  # the copy reads it after this returns
    return host.to(device, non_blocking=True)


def _tables(rows: list, index: tuple, span_of, device, first: int = 0) -> Launch:
    """The launch over the tensors of ``rows`` (one list per address row, all the same length)."""
    keep: list = [x for row in rows for x in row]
    sizes = [x.numel() for x in rows[0]]
    block = block_size(max(sizes))
    span = span_of(block, sum(sizes))
    bt, bs = [], []
    for j, n in enumerate(sizes):
        starts = range(0, n, span)
        bt += [j] * len(starts)
        bs += list(starts)
    addresses = _to_device([[x.data_ptr() for x in row] for row in rows], torch.int64, device, keep)
    aligned = span % 16 == 0 and all(x.data_ptr() % 16 == 0 for row in rows for x in row)
    return Launch(addresses, _to_device(sizes, torch.int64, device, keep), _to_device(bt, torch.int32, device, keep),
                  _to_device(bs, torch.int64, device, keep), len(sizes), len(bt), block, span, (), device, tuple(index),
                  _to_device(list(index), torch.int64, device, keep), first=first, aligned=aligned, keep=tuple(keep))


def _one_span(block: int, total: int) -> int:
    return block


def _reduce_span(block: int, total: int) -> int:
    return block * max(1, math.ceil(total / (block * MAX_PARTS)))


def _cached(key, build):
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = build()
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return hit


def _check_lists(op: str, names: tuple, lists: tuple, updated=(), least: int = 0) -> tuple[list, torch.device | None]:
    """The tensor lists as lists (one tensor per position in each, same entries at a position,
    one device, float dtypes, updated tensors contiguous, others made contiguous)."""
    lists = [list(x) if not isinstance(x, torch.Tensor) else None for x in lists]
    for name, seq in zip(names, lists):
        if seq is None:
            raise TypeError(f"{op}: {name} must be a list of tensors (one per tensor of the launch), got a tensor")
    count = len(lists[0])
    for name, seq in zip(names, lists):
        if len(seq) != count:
            raise ValueError(f"{op}: {name} has {len(seq)} tensors but {names[0]} has {count}; one per position")
    if count == 0:
        return lists, None
    if not isinstance(lists[0][0], torch.Tensor):
        raise TypeError(f"{op}: {names[0]}[0] must be a torch.Tensor, got {type(lists[0][0]).__name__}")
    device = lists[0][0].device
    check_device(op, device)
    for name, seq in zip(names, lists):
        for j, x in enumerate(seq):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{op}: {name}[{j}] must be a torch.Tensor, got {type(x).__name__}")
            if x.device != device:
                raise ValueError(f"{op}: {name}[{j}] is on {x.device}, {names[0]}[0] on {device}")
            if x.dtype not in _TL:
                raise TypeError(f"{op}: {name}[{j}] is {x.dtype}; multi-tensor kernels take float32, float16 and bfloat16")
            if x.numel() != lists[0][j].numel():
                raise ValueError(f"{op}: {name}[{j}] has {x.numel()} entries but {names[0]}[{j}] has {lists[0][j].numel()}")
            if x.numel() < least:
                raise ValueError(f"{op}: {name}[{j}] has {x.numel()} entries; each tensor needs at least {least}")
            if not x.is_contiguous():
                if name in updated:
                    raise ValueError(f"{op}: {name}[{j}] is written in place, so it must be contiguous")
                seq[j] = x.contiguous()
    return lists, device


def _groups(lists: list) -> dict:
    """Positions grouped by their tensors' dtypes (one launch each), in order of first use."""
    groups: dict = {}
    for j in range(len(lists[0])):
        groups.setdefault(tuple(seq[j].dtype for seq in lists), []).append(j)
    return groups


# ------------------------------------------------------------------------------------------------
# scalars and params


def _device_scalar(op: str, name: str, value, device, per_tensor: int | None):
    """``(tensor, stride)``: a device tensor the kernel loads ``value`` from at ``tid * stride``."""
    if isinstance(value, torch.Tensor):  # read as it is (the kernel widens it to float64)
        v = value.to(device=device) if value.is_floating_point() else value.to(device=device, dtype=torch.float64)
        v = v.reshape(-1)
        if v.numel() == 1:
            return v, 0
        if per_tensor is not None and v.numel() == per_tensor:
            return v.contiguous(), 1
        raise ValueError(f"{op}: {name} must have one entry" + (f" or {per_tensor} (one per tensor)" if per_tensor else "")
                         + f", got {v.numel()}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got {value!r}") from None
    return _to_device([v], torch.float64, device, []), 0


def scalar_args(op: str, names: tuple, values: tuple, launch: Launch, total: int | None) -> list:
    """``ptr, stride`` for each scalar input, as the kernels take them: a number or a device tensor
    of one entry, or (``total`` not None) of one entry per tensor of the caller's lists, gathered
    for a launch that takes some of them."""
    out = []
    for name, value in zip(names, values):
        v, stride = _device_scalar(op, name, value, launch.device, total)
        if stride and launch.count != total:
            v = v.index_select(0, launch.positions)
        out += [v, stride]
    return out


_PARAMS: dict = {}


def param_table(values: tuple, device) -> torch.Tensor:
    """The params as a float64 device tensor the kernel loads (float64: ``1 - beta2`` keeps its
    digits), one per distinct set of values and device, so a step copies nothing to the device."""
    key = (device, values)
    hit = _PARAMS.get(key)
    if hit is None:
        if len(_PARAMS) > 256:
            _PARAMS.clear()
        hit = _PARAMS[key] = torch.tensor(values if values else (0.0,), dtype=torch.float64, device=device)
    return hit


# ------------------------------------------------------------------------------------------------
# the three kinds of launch


def run_update(op: str, kernel, names: tuple, updated: tuple, lists: tuple, scalar_names: tuple, scalars: tuple,
               params: tuple, master) -> None:
    """An update rule's step: one launch writes the new values over the ``updated`` lists.
    Every list holds one dtype (the rule's state follows its parameters); ``master``: fp32 copies
    of bf16/fp16 parameters (the first list), updated in their place while the parameters get
    their rounding."""
    lists, device = _check_lists(op, names, lists, updated)
    masters = list(master) if master is not None else None
    if masters is not None and len(masters) != len(lists[0]):
        raise ValueError(f"{op}: master has {len(masters)} tensors but {names[0]} has {len(lists[0])}")
    if device is None:
        return
    for name, seq in zip(names, lists):
        if any(x.dtype != seq[0].dtype for x in seq):
            bad = next(j for j, x in enumerate(seq) if x.dtype != seq[0].dtype)
            raise TypeError(f"{op}: {name}[{bad}] is {seq[bad].dtype} but {name}[0] is {seq[0].dtype}; "
                            "an update takes one dtype per list")
    dtypes = [_TL[seq[0].dtype] for seq in lists]
    rows, low_dtype = list(lists), tl.float32
    if masters is not None:
        for j, (m, p) in enumerate(zip(masters, lists[0])):
            if m.dtype != torch.float32 or m.numel() != p.numel() or not m.is_contiguous() or m.device != device:
                raise ValueError(f"{op}: master[{j}] must be a contiguous float32 tensor like {names[0]}[{j}] on {device}")
        low_dtype = dtypes[0]
        rows = [masters] + rows[1:] + [lists[0]]
        dtypes[0] = tl.float32
    key = ("update", device, tuple(x.data_ptr() for row in rows for x in row), tuple(x.numel() for x in lists[0]))
    launch = _cached(key, lambda: _tables(rows, tuple(range(len(lists[0]))), _one_span, device))
    if not launch.blocks:
        return
    kernel[(launch.blocks,)](
        launch.addresses, launch.sizes, launch.block_tensor, launch.block_start, launch.count,
        *scalar_args(op, scalar_names, scalars, launch, launch.count), param_table(params, device),
        *dtypes, HAS_MASTER=masters is not None, LOW_DTYPE=low_dtype, ALIGNED=launch.aligned, BLOCK=launch.block,
    )


def _outs(op: str, lists: list, out, out_names: tuple) -> list:
    """The output lists: new tensors shaped as the first input's, or the caller's ``out``."""
    if out is None:
        return [[torch.empty_like(x, memory_format=torch.contiguous_format) for x in lists[0]] for _ in out_names]
    out = [out] if len(out_names) == 1 else list(out)
    if len(out) != len(out_names):
        raise ValueError(f"{op}: out must hold {len(out_names)} lists (one per output: {', '.join(out_names)})")
    return [list(seq) if not isinstance(seq, torch.Tensor) else [seq] for seq in out]


def run_map(op: str, kernel, names: tuple, lists: tuple, scalar_names: tuple, scalars: tuple, params: tuple,
            out, out_names: tuple):
    """Each output of each tensor: one launch per group of dtypes. ``out``: lists to write the
    outputs into (an input's own list computes in place: each entry is read before it is written);
    by default new tensors. Returns the output list (a tuple of lists for several outputs)."""
    inputs, device = _check_lists(op, names, lists)
    outs = _outs(op, inputs, out, out_names)
    all_lists, _ = _check_lists(op, names + out_names, tuple(inputs) + tuple(outs), updated=out_names)
    if device is not None:
        for group, index in _groups(all_lists).items():
            rows = [[seq[j] for j in index] for seq in all_lists]
            key = ("map", device, tuple(x.data_ptr() for row in rows for x in row), tuple(x.numel() for x in rows[0]))
            launch = _cached(key, lambda: _tables(rows, tuple(index), _one_span, device))
            if not launch.blocks:
                continue
            kernel[(launch.blocks,)](
                launch.addresses, launch.sizes, launch.block_tensor, launch.block_start, launch.count,
                *scalar_args(op, scalar_names, scalars, launch, len(inputs[0])), param_table(params, device),
                *(_TL[d] for d in group), ALIGNED=launch.aligned, BLOCK=launch.block,
            )
    return outs[0] if len(out_names) == 1 else tuple(outs)


@dataclass
class _Reduction:
    launches: list
    parts: torch.Tensor  # fp32, one partial value per program of stage one
    final: Launch  # stage two: one program over ``parts``


def run_reduce(op: str, kernel, name: str, tensors, scalar_names: tuple, scalars: tuple, params: tuple,
               least: int = 0) -> torch.Tensor:
    """The op's value over all of ``tensors`` together (a 0-dim tensor of their promoted dtype):
    stage one, one launch per dtype, writes the op's value over each program's span of a tensor;
    stage two, one launch of one program, the op over those values. Nothing is read back to the
    host. ``least``: the fewest entries the op takes per tensor (a max needs one)."""
    (seq,), device = _check_lists(op, (name,), (tensors,), least=least)
    if device is None:
        raise ValueError(f"{op}: no tensors: the value of an empty list is undefined here (the caller decides it)")
    dtype = seq[0].dtype
    for x in seq[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    groups = _groups([seq])
    key = ("reduce", device, tuple((x.data_ptr(), x.numel(), x.dtype) for x in seq))  # dtypes: the grouping

    def build():
        launches, first = [], 0
        for index in groups.values():
            launch = _tables([[seq[j] for j in index]], tuple(index), _reduce_span, device, first)
            launches.append(launch)
            first += launch.blocks
        parts = torch.empty(max(first, 1), dtype=torch.float32, device=device)
        final = _tables([[parts]], (0,), lambda b, n: math.ceil(n / b) * b, device)
        if first == 0:  # every tensor is empty: stage two reduces nothing (the op's identity)
            final.sizes.zero_()
        return _Reduction(launches, parts, final)

    red = _cached(key, build)
    total = torch.empty((), dtype=dtype, device=device)
    for launch, group in zip(red.launches, groups):
        if launch.blocks:
            kernel[(launch.blocks,)](
                launch.addresses, launch.sizes, launch.block_tensor, launch.block_start, launch.count, red.parts,
                launch.first, launch.span, *scalar_args(op, scalar_names, scalars, launch, None),
                param_table(params, device), _TL[group[0]], ALIGNED=launch.aligned, BLOCK=launch.block,
            )
    f = red.final
    kernel[(1,)](f.addresses, f.sizes, f.block_tensor, f.block_start, 1, total, 0, f.span,
                 *scalar_args(op, scalar_names, scalars, f, None), param_table(params, device), tl.float32,
                 ALIGNED=f.aligned, BLOCK=f.block)
    return total
