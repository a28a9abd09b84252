"""Host glue of the generated Triton update rules: the tables of a multi-tensor launch.

A launch updates many tensors of different sizes at once. Its tables live on the device:

``addresses``     int64 ``[K, T]``: row k holds the base address of the rule's k-th tensor input for
                  each of the T parameters (and, with master weights, a last row of the bf16/fp16
                  parameters); a kernel bitcasts an entry to a pointer of that input's dtype;
``sizes``         int64 ``[T]``: entries of each parameter;
``block_tensor``  int32 ``[blocks]`` and ``block_start`` int64 ``[blocks]``: which tensor each program
                  updates and its first entry; no copy of any tensor is made.

The tables depend only on the tensors' addresses and sizes, which an optimizer keeps from step to
step, so they are built once and cached (the cache holds the tensors, so an address cannot be
reused by another tensor while its entry lives).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import triton.language as tl

from .domains import check_params  # noqa: F401  (the generated update modules check their params with it)
from .triton_support import check_device, interpreting

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64


@dataclass
class Launch:
    addresses: torch.Tensor
    sizes: torch.Tensor
    block_tensor: torch.Tensor
    block_start: torch.Tensor
    count: int  # T, the tensors per input
    blocks: int
    block: int
    dtypes: tuple  # one tl dtype per tensor input (the kernel's *_DTYPE constexprs)
    master: bool
    low_dtype: object
    device: torch.device
    keep: tuple = ()  # the tensors the addresses point into


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


def plan_launch(op: str, names: tuple, updated: tuple, lists: tuple, master) -> Launch | None:
    """Check the tensor lists (one tensor per parameter in each, same entries per parameter, one
    device, one dtype per list, updated tensors contiguous) and return the cached launch tables;
    None when there is nothing to update."""
    lists = [list(x) for x in lists]
    count = len(lists[0])
    for name, seq in zip(names, lists):
        if len(seq) != count:
            raise ValueError(f"{op}: {name} has {len(seq)} tensors but {names[0]} has {count}; one per parameter")
    masters = list(master) if master is not None else None
    if masters is not None and len(masters) != count:
        raise ValueError(f"{op}: master has {len(masters)} tensors but p has {count}")
    if count == 0:
        return None
    device = lists[0][0].device
    check_device(op, device)
    dtypes = []
    for k, (name, seq) in enumerate(zip(names, lists)):
        dt = seq[0].dtype
        for j, x in enumerate(seq):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{op}: {name}[{j}] must be a torch.Tensor, got {type(x).__name__}")
            if x.device != device:
                raise ValueError(f"{op}: {name}[{j}] is on {x.device}, {names[0]}[0] on {device}")
            if x.dtype != dt or dt not in _TL:
                raise TypeError(f"{op}: {name}[{j}] is {x.dtype}; each list holds one of float32, float16, bfloat16")
            if x.numel() != lists[0][j].numel():
                raise ValueError(f"{op}: {name}[{j}] has {x.numel()} entries but {names[0]}[{j}] has {lists[0][j].numel()}")
            if not x.is_contiguous():
                if name in updated:
                    raise ValueError(f"{op}: {name}[{j}] is updated in place, so it must be contiguous")
                seq[j] = x.contiguous()
        dtypes.append(_TL[dt])
    low_dtype = tl.float32
    rows = [list(seq) for seq in lists]
    if masters is not None:
        for j, (m, p) in enumerate(zip(masters, lists[0])):
            if m.dtype != torch.float32 or m.numel() != p.numel() or not m.is_contiguous() or m.device != device:
                raise ValueError(f"{op}: master[{j}] must be a contiguous float32 tensor like p[{j}] on {device}")
        low_dtype = _TL[lists[0][0].dtype]
        rows = [masters] + rows[1:] + [lists[0]]
        dtypes[0] = tl.float32
    sizes = tuple(x.numel() for x in lists[0])
    key = (device, tuple(x.data_ptr() for row in rows for x in row), sizes)
    hit = _CACHE.get(key)
    if hit is None:
        block = block_size(max(sizes))
        bt, bs = [], []
        for j, n in enumerate(sizes):
            starts = range(0, n, block)
            bt += [j] * len(starts)
            bs += list(starts)
        addresses = torch.tensor([[x.data_ptr() for x in row] for row in rows], dtype=torch.int64, device=device)
        hit = Launch(addresses, torch.tensor(sizes, dtype=torch.int64, device=device),
                     torch.tensor(bt, dtype=torch.int32, device=device), torch.tensor(bs, dtype=torch.int64, device=device),
                     count, len(bt), block, (), masters is not None, None, device, tuple(x for row in rows for x in row))
        _CACHE[key] = hit
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    hit.dtypes, hit.low_dtype, hit.keep = tuple(dtypes), low_dtype, tuple(x for row in rows for x in row)
    return hit


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
        return torch.tensor([float(value)], dtype=torch.float64, device=device), 0
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got {value!r}") from None


def scalars(op: str, launch: Launch, lr, t) -> tuple:
    """The kernel's ``lr_ptr, t_ptr, t_stride`` (a placeholder where the rule reads no lr or t)."""
    lr_t, _ = _device_scalar(op, "lr", 0.0 if lr is None else lr, launch.device, None)
    t_t, stride = _device_scalar(op, "t", 0.0 if t is None else t, launch.device, launch.count)
    return lr_t, t_t, stride


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
