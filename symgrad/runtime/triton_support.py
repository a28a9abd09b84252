"""Host- and device-side helpers shared by the generated Triton modules (``generated/triton``).

Device side: the ``sg_*`` ``@triton.jit`` functions are the stable spellings the Triton printer
uses (sigmoid, softplus, tanh, log1p, expm1, pow). Host side: input checks that raise a clear
``ValueError`` before any launch (device, dtype, rank, sizes), dimension binding, launch
geometry, and the small pieces of the ``torch.library`` registration every module shares.

Kernels run compiled on CUDA, or on CPU tensors through Triton's interpreter when the
environment has ``TRITON_INTERPRET=1`` (set it before ``triton`` is first imported).
"""
from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from .leading import fold, fold_like, unfold  # noqa: F401  (leading axes, shared with the NumPy modules)
from .domains import check_params, check_sizes, label_error  # noqa: F401  (param domains and least sizes, shared with the NumPy modules)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)




def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op's kernels compute and accumulate in (and its intermediates, partial sums
    and split-K workspaces are allocated in): float64 for float64 tensors, else float32. The
    kernels read the same choice from their buffers (``ACC``, the first line of each)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Device helpers (in and out in the kernel's ACC dtype: fp32, or fp64 for float64 tensors)


@triton.jit
def sg_sigmoid(z):
    # Never exp of a large positive number: e = exp(-|z|) is in (0, 1].
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def sg_log1p(u):
    # log(1 + u) accurate near 0: log(w) * u / (w - 1) with w = 1 + u rounded.
    w = 1.0 + u
    d = tl.where(w == 1.0, 1.0, w - 1.0)
    return tl.where(w == 1.0, u, tl.log(w) * (u / d))


@triton.jit
def sg_expm1(u):
    # exp(u) - 1 accurate near 0 (Kahan): (w - 1) * u / log(w) with w = exp(u) rounded.
    w = tl.exp(u)
    lw = tl.log(w)
    d = tl.where((w == 1.0) | (lw == 0.0), 1.0, lw)
    r = tl.where(w - 1.0 == -1.0, -1.0, (w - 1.0) * (u / d))
    r = tl.where(w == float("inf"), w, r)
    return tl.where(w == 1.0, u, r)


@triton.jit
def sg_softplus(z):
    # log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)): no overflow for large |z|.
    return tl.maximum(z, 0.0) + sg_log1p(tl.exp(-tl.abs(z)))


@triton.jit
def sg_tanh(z):
    # tanh via exp: sign(z) * (1 - e) / (1 + e), e = exp(-2|z|), with 1 - e = -expm1(-2|z|).
    a = tl.abs(z)
    t = -sg_expm1(-2.0 * a) / (1.0 + tl.exp(-2.0 * a))
    return tl.where(z < 0, -t, t)


@triton.jit
def sg_pow(b, e):
    # b**e for real e; negative bases only for integer e (else nan, as in real arithmetic).
    r = tl.exp(e * tl.log(tl.abs(b)))
    is_int = e == tl.floor(e)
    odd = (e - 2.0 * tl.floor(e * 0.5)) == 1.0
    at_zero = tl.where(e > 0, 0.0, tl.where(e == 0, 1.0, float("inf")))
    neg = tl.where(is_int, tl.where(odd, -r, r), float("nan"))
    return tl.where(b > 0, r, tl.where(b == 0, at_zero, neg))


# ---------------------------------------------------------------------------------------------
# float64 params on a GPU


def float_params(kernel, dtype: torch.dtype, names: tuple):
    """``kernel``, or for float64 tensors compiled on a GPU a variant whose float params ``names``
    (``p_eps``, ``f_C``...) are fp64 arguments: Triton passes a Python float as an fp32 argument,
    which would give a float64 kernel a param with fp32's 24-bit mantissa (``label_smoothing=0.1``
    acting as 0.1 + 1.5e-9). fp32 and 16-bit tensors launch ``kernel`` itself; the interpreter
    hands Python floats to the kernel unrounded, so it launches ``kernel`` too."""
    if dtype != torch.float64 or interpreting():
        return kernel
    return _fp64_variant(kernel, tuple(names))


@functools.lru_cache(maxsize=None)
def _fp64_variant(kernel, names: tuple):
    import copy
    import inspect
    import types

    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        tuned = copy.copy(kernel)  # the same configs, key and pruning; its own cache of choices
        tuned.cache = {}
        tuned.fn = _fp64_variant(kernel.fn, names)
        return tuned
    fn = kernel.fn
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__module__ = fn.__module__
    new.__qualname__ = f"{fn.__qualname__}__fp64_params"  # its own entry in Triton's registry of jit functions
    sig = inspect.signature(fn)
    new.__signature__ = sig.replace(parameters=[p.replace(annotation="fp64") if p.name in names else p
                                                for p in sig.parameters.values()])
    return triton.jit(new)


# ---------------------------------------------------------------------------------------------
# Launch geometry


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fdim(n: int) -> float:
    """A dim as a float kernel argument (``x/D``, ``eps/C``). Compiled, it is fp32 and ``eps/0.0``
    is IEEE's inf; the interpreter computes with the Python float, where ``eps/0.0`` raises
    ZeroDivisionError (cross-entropy with no classes): there an empty dim is NumPy's float64 zero,
    a Python float whose quotients (and those of products with it) are IEEE's."""
    return np.float64(0.0) if n == 0 and interpreting() else float(n)


def _max_block() -> int:
    # Tests lower the cap (SYMGRAD_TRITON_MAX_BLOCK=16) so that rows span several column blocks.
    return int(os.environ.get("SYMGRAD_TRITON_MAX_BLOCK", "0")) or (1024 if interpreting() else 4096)


SINGLE_BLOCK_MAX = 16384  # longest row a row kernel holds in registers as one block
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90): what one block's live values share
ROW_OVERHEAD_REGS = 20  # per thread, beside its columns' values: row and column indices, pointers, loop state


def single_block_fits(block: int, live: int) -> bool:
    """Whether one block of ``block`` columns holds ``live`` fp32 values per column in registers:
    per thread (of ``row_warps(block)`` warps, which share one SM's register file, at most 255
    each), its columns' values and ``ROW_OVERHEAD_REGS``. At 16384 columns 32 warps leave 64
    registers a thread for 16 columns: three values per column at most (the sm_90 compile report
    found spills inside the row loop at four: bias_add backward, sigmoid cross-entropy and
    softcapped or weighted cross-entropy forward, at 11001 columns)."""
    threads = 32 * row_warps(block)
    return live * -(-block // threads) + ROW_OVERHEAD_REGS <= row_regs(block)


def row_regs(block: int) -> int:
    """Registers a thread of a row kernel may use: one block of ``row_warps(block)`` warps per SM,
    at most 255. The host passes it as ``maxnreg`` (``.maxnreg`` for ptxas): without it the
    register allocator Triton runs (``--regAllocOptLevel=2``) held cross-entropy's bf16 column
    loop (8192 columns, 16 warps) to 64 registers and spilled inside it; given 128 it used 92
    and spilled nothing."""
    return min(255, REGISTER_FILE // (32 * row_warps(block)))


def row_block(n_cols: int, itemsize: int = 4, live: int = 1) -> int:
    """Columns per block of a row kernel. The whole row in one block when it fits: at most
    ``SINGLE_BLOCK_MAX`` columns, and its ``live`` fp32 values per column (the kernel's column
    operands, two per column partial sum, one for temporaries and one per costly value several
    passes share, as a tanh the compiler computes once: the generated host code says how many)
    within its threads' registers (:func:`single_block_fits`). The kernel's ``SINGLE_BLOCK`` path
    then reads each row operand from memory once and runs every pass from registers; a row over
    the budget spills there (layer norm backward at 16384 columns: 780 bytes per thread), so it
    loops over blocks instead. Those blocks hold their live values in half the register file
    (two programs per SM), up to the loop cap. ``SYMGRAD_TRITON_MAX_BLOCK`` caps every block
    (tests force several blocks with it)."""
    want = triton.next_power_of_2(max(int(n_cols), 1))
    live = max(int(live), 1) * (2 if itemsize >= 8 else 1)  # a float64 value takes two 32-bit registers
    if os.environ.get("SYMGRAD_TRITON_MAX_BLOCK"):
        return max(16, min(want, _max_block()))
    if want <= SINGLE_BLOCK_MAX and single_block_fits(want, live):
        return max(16, want)
    cap = _max_block()
    if not interpreting() and itemsize <= 2:
        cap = min(cap * 2, 8192)
    while cap > 1024 and cap * live > REGISTER_FILE // 2:
        cap //= 2
    return max(16, min(cap, want))


def contiguous(*tensors) -> bool:
    """Whether a map kernel may address these same-shaped tensors by one flat offset."""
    return all(t.is_contiguous() for t in tensors)


def map_block(n: int) -> int:
    return max(16, min(triton.next_power_of_2(max(int(n), 1)), _max_block() if interpreting() else 1024))


def row_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 4096 else (16 if block <= 8192 else 32))


# Set by ``planning_for``: the SM count and L2 bytes of a GPU the host code plans launches for without one.
_PLANNED_SMS: int | None = None
_PLANNED_L2: int | None = None


@contextlib.contextmanager
def planning_for(sm_count: int, l2_bytes: int | None = None):
    """Run the host code on ``meta`` tensors as if on a GPU with ``sm_count`` SMs (and ``l2_bytes``
    of L2; H100's 50 MB if not given), so that a tool (``bench/compile_report.py``) can record the
    launches it would make (grid, blocks, warps) without a GPU and without restating any launch
    choice. Kernels must not be run meanwhile."""
    global _PLANNED_SMS, _PLANNED_L2
    before = _PLANNED_SMS, _PLANNED_L2
    _PLANNED_SMS, _PLANNED_L2 = int(sm_count), (int(l2_bytes) if l2_bytes else None)
    try:
        yield
    finally:
        _PLANNED_SMS, _PLANNED_L2 = before


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _cuda_l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or L2_DEFAULT_BYTES)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count(device: torch.device) -> int | None:
    if device.type == "meta" and _PLANNED_SMS is not None:
        return _PLANNED_SMS
    if device.type == "cuda":
        return _cuda_sm_count(_cuda_index(device))
    return None


L2_DEFAULT_BYTES = 50 * 10**6  # H100/H200's L2, for a device that does not say (and the interpreter)
L2_REREAD_SHARE = 0.8  # of the L2: what the programs in flight may keep there, with room for their writes


def l2_reread_bytes(device: torch.device) -> int:
    """The L2 bytes the programs in flight may keep hot: ``L2_REREAD_SHARE`` of the device's L2
    (40 MB on H100/H200, 32 MB on A100)."""
    if device.type == "meta" and _PLANNED_L2 is not None:
        l2 = _PLANNED_L2
    elif device.type == "cuda":
        l2 = _cuda_l2_bytes(_cuda_index(device))
    else:
        l2 = L2_DEFAULT_BYTES
    return int(l2 * L2_REREAD_SHARE)


def row_programs(n_rows: int, device: torch.device, partial: bool, hot_bytes: int = 0,
                 per_sm: int = 4, partial_rows: bool = False) -> tuple[int, int]:
    """(programs, rows per program) of a row kernel: one program per row, or ``per_sm`` per SM for
    a kernel that reduces across rows with partial sums. A kernel with column partials (a norm's
    dw, dbias) asks for one per SM: each program leaves a partial row as long as a row of its
    input, written and then read by the finishing kernel: at 4 per SM, layer norm backward over
    4096 rows moved a sixth (fp32) to a third (bf16) more than its least.

    ``hot_bytes``: what one program of a multi-block row needs to find in L2: the row a later pass
    reads again and, with ``partial_rows``, the fp32 partial row of each column partial that it
    adds every row into (a norm's dw, dbias). Those hit L2 only while every program's fit there
    at once (:func:`l2_reread_bytes`), so the programs (then all resident) are capped to fit.
    A plain re-read keeps at least one program per SM: past the cap it costs one more read of the
    row (fp32 cross-entropy rows of 128K columns). Column partials take the cap below one per SM:
    past it every row would also read and write the partial rows in memory (layer norm backward
    at 65536 columns moved 3 to 4 times its least), so 50 programs (bf16; 38 in fp32) on an
    H100's 132 SMs move what 132 would, plus 2% of partial rows, if they draw the bandwidth."""
    n = max(int(n_rows), 1)
    sms = _sm_count(device) or 4  # interpreted: a few programs, so partial sums span programs
    most = per_sm * sms if partial else n
    if hot_bytes:
        fit = max(1, l2_reread_bytes(device) // int(hot_bytes))
        most = min(most, fit if partial_rows else max(sms, fit))
    rpp = max(1, triton.cdiv(n, most))
    return max(1, triton.cdiv(n, rpp)), rpp


def scale_geometry(n: int, device: torch.device) -> tuple[int, int, int]:
    """(block, programs, elements per program) of an in-place scale over ``n`` contiguous
    elements: a few programs per SM, each walking one contiguous chunk (a multiple of the block)."""
    blk = map_block(n) if interpreting() else 2048
    sms = _sm_count(device)
    most = 4 * sms if sms is not None else 4
    n_prog = max(1, min(triton.cdiv(max(n, 1), blk), most))
    chunk = triton.cdiv(triton.cdiv(max(n, 1), n_prog), blk) * blk
    return blk, triton.cdiv(max(n, 1), chunk), chunk


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) on tensor cores (16-bit inputs, TF32): Hopper-sized
# tiles first (wgmma wants 64-row multiples per warp group and deep K tiles), then smaller ones for
# small or skinny products.
GEMM_TILES = (
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 32, 4, 4),
)
GEMM_TILES_64 = ((64, 64, 16, 4, 3),)  # float64 (see prune_gemm_configs)
# fp32 on FMA units (PREC ieee): a K tile of at most 32 (a deeper one, or a larger fp32 tile,
# spills), and eight warps on the small tile: with four, ptxas held dX = dY Wᵀ at 128 registers
# and spilled inside the K loop on sm_90 (257 x 257 x 257).
GEMM_TILES_FMA = (
    (128, 128, 32, 8, 4),
    (64, 64, 32, 8, 4),
)
GEMM_OVERHANG = 2 * max(t[2] for t in GEMM_TILES + GEMM_TILES_FMA)  # a K tile past the end, and one more step of the carried offsets
GEMM_SMEM_BUDGET = 160 * 1024  # operand stages must fit sm_80's 163 KB too; sm_90 has 227 KB
# Operand entries one thread may load per K tile when they are loaded one by one (rows not 16-byte
# aligned): each is a load with its own address. At 96 (128 x 256 x 64 on 8 warps, 64 x 128 x 64
# on 4), matmul at 257 x 257 x 257 in bf16 spilled inside the K loop on sm_90 and sm_80.
GEMM_SCALAR_ENTRIES = 64


def _tile(c) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def gemm_configs() -> list:
    """The autotuned configurations of the implicit-GEMM kernels (both tile sets: the prune keeps
    one). The interpreter gets one small config: autotuning would only run every config through
    it (slow, and meaningless on CPU)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    tiles = GEMM_TILES + tuple(t for t in GEMM_TILES_FMA if t not in GEMM_TILES)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]


def prune_gemm_configs(configs, nargs, **kwargs) -> list:
    """Configs worth timing for one launch: the tile set of where the product runs (tensor cores,
    or FMA units for fp32 at PREC ieee), then :func:`fit_tiles` (float64 compiled runs
    ``GEMM_TILES_64``)."""
    if not interpreting():
        fma = kwargs.get("PREC", nargs.get("PREC")) == "ieee" and bool(kwargs.get("DOT_F32", nargs.get("DOT_F32")))
        tiles = GEMM_TILES_FMA if fma else GEMM_TILES
        configs = [c for c in configs if _tile(c) in tiles] or configs
    return fit_tiles(configs, nargs)


def vector_operands(nargs) -> bool:
    """Whether Triton may read a launch's tensors 16 bytes at a time: every tensor 16-byte aligned
    and every integer argument (strides, extents) 1 or a multiple of 16, which is what Triton's
    specialization tells the compiler. Otherwise (a row of 257 bf16 entries) some operand is
    loaded entry by entry."""
    for v in nargs.values():
        if isinstance(v, torch.Tensor):
            if v.data_ptr() % 16:
                return False
        elif isinstance(v, int) and not isinstance(v, bool) and v != 1 and v % 16:
            return False
    return True


def fit_tiles(configs, nargs) -> list:
    """The configs that fit one launch: tiles no larger than the problem (next power of two, at
    least 16, as tl.dot needs), operand stages within the shared-memory budget, and, where the
    operands are loaded entry by entry, at most ``GEMM_SCALAR_ENTRIES`` entries per thread and K tile."""
    def cap(n) -> int:
        return max(16, triton.next_power_of_2(max(int(n), 1)))

    m, n = cap(nargs["M_tot"]), cap(nargs["N_tot"])
    itemsize = max((t.element_size() for t in nargs.values() if isinstance(t, torch.Tensor)), default=2)
    scalar = not vector_operands(nargs)
    keep = []
    for c in configs:
        bm, bn, bk, warps, stages = _tile(c)
        if bm > m or bn > n:
            continue
        if (bm * bk + bk * bn) * itemsize * stages > GEMM_SMEM_BUDGET:
            continue
        if scalar and bm * bk + bk * bn > GEMM_SCALAR_ENTRIES * 32 * warps:
            continue
        keep.append(c)
    if itemsize >= 8 and not interpreting():
        # float64: an accumulator entry takes two registers and an operand entry twice the shared
        # memory, so the fp32 tiles spill inside the K loop (sm_90); one smaller tile instead
        keep = [triton.Config({"BLOCK_M": min(m, bm), "BLOCK_N": min(n, bn), "BLOCK_K": bk}, num_warps=w, num_stages=st)
                for bm, bn, bk, w, st in GEMM_TILES_64]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 tl.dot is wrong (triton 3.x): compute interpreted dots in fp32.
    return interpreting() or dtype == torch.float32


def tf32_allowed() -> bool:
    """Whether torch lets float32 matmuls use TF32, as torch decides it for its own: the newer
    ``torch.backends.cuda.matmul.fp32_precision`` when set, else the float32 matmul precision
    (``torch.set_float32_matmul_precision("high")`` or ``"medium"``) or ``allow_tf32``."""
    explicit = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if explicit in ("tf32", "ieee"):
        return explicit == "tf32"
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 when torch allows it, IEEE fp32 (FMA) otherwise;
    16-bit inputs run on tensor cores exactly either way."""
    return "tf32" if dtype == torch.float32 and tf32_allowed() else "ieee"


# ---------------------------------------------------------------------------------------------
# Checks (all raise ValueError before any kernel is launched)


def check_inputs(op: str, specs) -> tuple[torch.dtype, torch.device]:
    """``specs``: (name, tensor, rank, is_label) per input. Returns the op's float dtype and device."""
    dtype = device = None
    first = None
    for name, t, rank, is_label in specs:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: input {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{op}: input {name} must have {rank} dims, got shape {tuple(t.shape)}")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{op}: input {name} is on {t.device} but {first} is on {device}; all inputs must share a device")
        if is_label:
            if t.dtype not in LABEL_DTYPES:
                raise ValueError(f"{op}: input {name} holds integer labels; got dtype {t.dtype}")
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: input {name} must have dtype float32, float16, bfloat16 or float64; got {t.dtype}")
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            raise ValueError(f"{op}: input {name} is {t.dtype} but other inputs are {dtype}; cast them to one dtype")
    check_device(op, device)
    return dtype, device


def check_labels(op: str, name: str, labels: torch.Tensor, n: int, ignore=None) -> None:
    """Labels outside ``[0, n)`` other than ``ignore`` are an error, never a loss, at no host sync
    on a GPU: there the check is ``torch._assert_async`` (a device-side assert, as torch's own CUDA
    cross-entropy fails on such a label: the error surfaces at the next synchronizing call and
    leaves the CUDA context unusable, as torch's does). On the CPU (the interpreter) the labels are
    in host memory already, so the check is exact and names the first bad label and its row."""
    if labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= n)
    if ignore is not None:
        bad &= labels != ignore
    if labels.device.type != "cpu":
        torch._assert_async(~bad.any(), f"{op}: a label of {name} is out of bounds: labels must lie in [0, {n}) or equal ignore_index ({ignore})")
        return
    if bad.any():
        row = int(bad.to(torch.uint8).argmax())
        raise label_error(op, name, row, int(labels[row]), n, ignore)


def check_device(op: str, device: torch.device) -> None:
    if device.type == "cuda" or (device.type == "meta" and _PLANNED_SMS is not None):
        return
    if device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{op}: tensors are on {device}; the Triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
    )


def bind_dims(op: str, entries) -> dict:
    """``entries``: (name, tensor, dim names) per tensor. Every dim must have one size throughout."""
    dims: dict = {}
    where: dict = {}
    for name, t, names in entries:
        for axis, d in enumerate(names):
            size = t.shape[axis]
            if d in dims and dims[d] != size:
                raise ValueError(
                    f"{op}: dim {d} is {dims[d]} in {where[d]} but {size} in {name} (axis {axis}, shape {tuple(t.shape)})"
                )
            dims.setdefault(d, size)
            where.setdefault(d, name)
    return dims


def programs(grid) -> bool:
    """Whether a launch grid has any program: a grid of 0 programs (an empty batch) is an error
    in Triton, and has nothing to compute, so the generated host code skips that launch."""
    return all(int(g) > 0 for g in grid)


def check_cotangent(op: str, name: str, t, shape, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: cotangent {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: cotangent {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: cotangent {name} is on {t.device}, the saved values on {device}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: cotangent {name} must be a float tensor; got {t.dtype}")


def check_constants(op: str, tensors: dict) -> None:
    """``apply``'s constant inputs (a loss's targets, class weights) get no gradient: one that
    requires grad while autograd records is refused, never left silently without its gradient
    (torch differentiates a loss's targets, and refuses cross-entropy's class weights)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(f"{op}: input {name} requires grad, but {op} takes it as a constant: no gradient is "
                               f"derived for it. Pass {name}.detach() (or declare {name} differentiable in the op)")


def check_int_param(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise TypeError(f"{op}: param {name} must be an integer, got {value!r}")
    return int(value)


def check_float_param(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: param {name} must be a number, got {value!r}")
    return float(value)




# ------------------------------------------------------------------------------------------------
# fused-loss gradients: forward's buffer, handed out by backward once


def take_fused(op: str, saved: dict, name: str):
    """The buffer forward wrote a fused loss's gradient into, which backward scales in place and
    hands out as the gradient: it can serve one backward only, so a second one on the same saved
    values raises instead of scaling a gradient already handed out."""
    taken = saved.setdefault("_taken", set())
    if name in taken:
        raise RuntimeError(
            f"{op}: backward already ran on these saved values: the gradient it returned is the buffer "
            f"forward wrote ({name}), scaled in place. Call forward_with_saved again for another backward.")
    taken.add(name)
    t = saved[name]
    if not t.is_contiguous():
        raise ValueError(f"{op}: the fused gradient buffer {name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    return t


def check_overwritable(op: str, name: str, t) -> None:
    """``inplace=True`` writes a fused gradient into input ``name``'s own buffer: one dense block."""
    if not t.is_contiguous():
        raise ValueError(f"{op}: inplace=True writes the gradient into {name}, which must then be contiguous "
                         f"(shape {tuple(t.shape)}, strides {t.stride()}); pass {name}.contiguous() or inplace=False")


def check_inplace_apply(op: str, tensors: dict) -> None:
    """``apply(..., inplace=True)`` overwrites inputs: never a leaf the caller keeps a gradient for,
    and not under torch.compile, whose graphs assume inputs unchanged (use the default there)."""
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{op}: inplace=True overwrites an input and runs eagerly only; under torch.compile use inplace=False")
    for name, t in tensors.items():
        if t.is_leaf and t.requires_grad:
            raise ValueError(f"{op}: inplace=True would overwrite {name}, a leaf tensor that requires grad; "
                             f"it is for intermediates nothing else reads (logits), not parameters or inputs")


def saved_once(op: str, ctx):
    """``ctx.saved_tensors`` of an op whose backward scales a saved buffer in place and hands it
    out: torch refuses a second read once that buffer changed; say why in the op's terms."""
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        if "inplace" not in str(e):
            raise
        raise RuntimeError(
            f"{op}: a saved tensor changed since forward. Backward scales the gradient forward saved in place "
            f"and hands that buffer out, so it runs once per forward: a second backward through the same call "
            f"(retain_graph=True) is not supported (with inplace=True, the input also must not change before "
            f"backward). Call the op again for another backward.") from e


# ------------------------------------------------------------------------------------------------
# saved tensors changed in place between forward_with_saved and backward (torch's version counters)


def _version(t):
    try:
        return t._version
    except (AttributeError, RuntimeError):  # not a tensor; inference tensors keep no version counter
        return None


def saved_versions(saved: dict, names) -> dict:
    """``{name: t._version}`` for the saved tensors ``names``, as autograd records them when it saves
    a tensor: any in-place change (of the tensor, of a view of it or of its base) bumps the count."""
    return {n: _version(saved[n]) for n in names}


def check_versions(op: str, saved: dict, inputs, outputs, leading=()) -> None:
    """Raise, as torch's autograd does, when a tensor ``forward_with_saved`` saved has been changed in
    place since: backward would otherwise differentiate at values forward never saw. A saved dict
    without ``_versions`` (the autograd path, where torch checks ``ctx.saved_tensors`` itself) passes.
    ``leading`` names the saved inputs and outputs whose first dim folds the user's leading axes:
    the message shows the shape the user passed or got, not the folded one."""
    for name, then in (saved.get("_versions") or {}).items():
        now = _version(saved[name])
        if then is None or now == then:
            continue
        t = saved[name]
        role = "input" if name in inputs else "output" if name in outputs else "saved value"
        shape = list(t.shape)
        if name in leading and saved.get("_lead") is not None:
            shape = list(saved["_lead"]) + shape[1:]
        raise RuntimeError(
            f"{op}: one of the tensors backward needs has been modified by an inplace operation: "
            f"{role} {name} [{str(t.dtype).replace('torch.', '')} {shape}] is at version {now}; "
            f"expected version {then} instead. Call forward_with_saved again after changing it, or "
            f"change a copy ({name}.clone()) instead.")


# Implicit-GEMM (stencil) launches: int32 index math, and split-K for filter gradients.
WIDE_INDEX = 2**30  # half of int32: a tile's overhanging rows and padded positions stay below 2^31


def wide_index(*extents, overhang: int = 0) -> bool:
    """Whether an implicit-GEMM launch needs int64 index math: a flattened extent, or a tensor's
    largest element offset, at or past 2^30 (then products of an index and a stride may pass
    int32). ``overhang``: entries a tile may address past a tensor's end along an axis (masked
    off, but the offset is still computed): a GEMM's K tiles, and the step its carried offsets
    take after the last one."""
    for e in extents:
        if isinstance(e, torch.Tensor):
            e = sum((s - 1 + overhang) * st for s, st in zip(e.shape, e.stride()) if s > 0) + 1 if e.numel() else 0
        if int(e) >= WIDE_INDEX:
            return True
    return False


SPLIT_K_LEAST = 512  # K entries a split program sums at least (8 of the largest BLOCK_K)


def split_k(m: int, n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(splits, K per split) of a plain-sum implicit GEMM: enough K splits that the output tiles
    (counted at the largest 128 x 128 tile) times the splits fill every SM once, each split summing
    at least SPLIT_K_LEAST entries (a multiple of the largest BLOCK_K). Without a GPU the
    interpreter's 16 x 16 tiles are counted against 8 programs, so tests run the split path."""
    tile, least, step = (16, 16, 16) if interpreting() else (128, SPLIT_K_LEAST, 64)
    sms = _sm_count(device) or 8
    tiles = max(1, triton.cdiv(m, tile) * triton.cdiv(n, tile))
    splits = max(1, min(triton.cdiv(sms, tiles), k // least))
    if splits == 1:
        return 1, k
    per = triton.cdiv(triton.cdiv(k, splits), step) * step
    return triton.cdiv(k, per), per


def split_workspace(splits: int, m: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The partial sums of a split-K launch (fp32; fp64 for float64 tensors), one (M, N) tile set per split."""
    return torch.empty((splits, m, n), dtype=acc_dtype(dtype), device=device)


def finish_split(ws: torch.Tensor, out: torch.Tensor, shape: tuple, perm: tuple) -> None:
    """Sum a split-K launch's partials in fp32 (in split order: deterministic) into ``out``, whose
    axes are the flattened M and N indices' ``shape`` permuted by ``perm``."""
    out.copy_(ws.sum(0).view(shape).permute(perm))


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of stencil launches. Their operand tiles are gathers
# (a pointer and a mask per entry, no TMA), so K tiles are shallower than a GEMM's: at BLOCK_K = 64,
# and in fp32 (FMA) at 128 x 64 x 16 or 64 x 64 x 32, the sm_90 compile report showed spills inside
# the K loop of conv2d's forward or dX (64 -> 128 channels, 3 x 3, 56 x 56).
STENCIL_TILES_16 = ((128, 128, 32, 8, 4), (128, 64, 32, 8, 4), (64, 64, 32, 4, 4))
STENCIL_TILES_32 = ((64, 64, 16, 4, 4),)


def stencil_configs() -> list:
    """The autotuned configurations of stencil launches (both tile sets: the prune keeps one)."""
    if interpreting():
        return gemm_configs()
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in STENCIL_TILES_16 + STENCIL_TILES_32]


def prune_stencil_configs(configs, nargs, **kwargs) -> list:
    """The tile set of the operands' width (the fp32 split-K workspace does not count), then
    :func:`fit_tiles`."""
    if interpreting():
        return fit_tiles(configs, nargs)
    wide = max((t.element_size() for k, t in nargs.items() if isinstance(t, torch.Tensor) and k != "WS_ptr"), default=2) == 4
    tiles = STENCIL_TILES_32 if wide else STENCIL_TILES_16
    keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in tiles]
    return fit_tiles(keep or configs, nargs)
