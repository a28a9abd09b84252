"""The ahead-of-time compile report (bench/compile_report.py) in CI, and the bytes model it reads.

The report compiles every generated Triton kernel for sm_90 at the launch configurations the
generated host code chooses, without a GPU; here it runs on the small shape set and must find no
compile error and no spill inside a loop. The bytes model (symgrad.traffic) is checked on plans
whose traffic is known by hand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import symgrad.ops  # noqa: F401
from symgrad import traffic
from symgrad.declare import REGISTRY
from symgrad.derive import derive
from symgrad.plan import lower

ROOT = Path(__file__).resolve().parents[1]


def _plan(name):
    return lower(derive(REGISTRY.get(name)))


def _row_launch(plan, kernel="forward"):
    k = getattr(plan, kernel)
    return next(l for l in k.launches if l.kind == "rows" and l.space[1] is not None)


def test_layer_norm_forward_passes_and_l2_rule():
    plan = _plan("layer_norm")
    launch = _row_launch(plan)
    assert traffic.row_passes(launch) == 3  # mean, then variance around it, then y
    sizes = {"B": 4096, "D": 65536}
    x = 4096 * 65536 * 2
    one = traffic.launch_traffic(plan, launch, sizes, 2, single_block=True)
    assert one.reads["x"] == x and one.writes["y"] == x and one.total == one.least
    # 1000 programs in flight hold 1000 rows of 128 KB = 131 MB: more than L2, so x is read 3 times
    many = traffic.launch_traffic(plan, launch, sizes, 2, resident_programs=1000)
    assert not many.rereads_free and many.reads["x"] == 3 * x
    # 300 rows (39 MB) fit in a 50 MB L2: the re-reads are free
    few = traffic.launch_traffic(plan, launch, sizes, 2, resident_programs=300)
    assert few.rereads_free and few.reads["x"] == x


def test_cross_entropy_online_max_sum_is_one_pass():
    plan = _plan("softmax_cross_entropy")
    launch = next(l for l in plan.forward.launches if l.kind == "rows" and l.space[1] is not None)
    assert traffic.row_passes(launch) == 2  # online max-and-sum, then the gradient
    least = traffic.minimum_bytes(plan, {"B": 8, "C": 1000}, 4)
    # forward+backward: logits and labels read once, gradient written once (scalars: loss, dloss)
    assert least["both"] == 8 * 1000 * 4 + 8 * 8 + 8 * 1000 * 4 + 4 + 4


def test_silu_backward_least_bytes():
    plan = _plan("silu")
    least = traffic.minimum_bytes(plan, {"B": 10, "C": 7}, 2)
    assert least["backward"] == 3 * 70 * 2  # x, dout read; dx written


@pytest.mark.slow
def test_compile_report_small_shapes(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_report.py"), "--small", "--arch", "90",
         "--dtypes", "bfloat16", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no CUDA toolchain (ptxas) in this triton install")
    assert out.exists(), proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["failures"] == [], "\n".join(doc["failures"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert doc["triton"] and doc["ptxas"]["sm_90"]
    ops = {r["op"] for r in doc["launches"]}
    assert ops == set(REGISTRY.names())  # every op's kernels were compiled
    for r in doc["launches"]:
        assert r["regs"] > 0 and r["ctas_per_sm"] >= 1, r
        assert r["loop_spills"] == 0 and "error" not in r, r
    gemm = [r for r in doc["launches"] if r["op"] == "linear" and r["kernel"].endswith("_gemm")]
    assert gemm and all(r["tensor_core"] > 0 for r in gemm)  # bf16 contractions use wgmma on sm_90
    # silu at 257 x 257 (an odd total): the full blocks load and store 128 bits (the tail block, a
    # branch of its own, masks element by element)
    flat = [r for r in doc["launches"] if r["op"] == "silu" and r["kernel"].endswith("_map")]
    assert flat and all(r["loads_v4"] >= 1 and r["stores_v4"] >= 1 for r in flat)


def _gemm_nargs(m, k, n, dtype):
    """The arguments a matmul launch's prune sees: meta operands and their strides."""
    import torch

    x, w, y = (torch.empty(s, dtype=dtype, device="meta") for s in ((m, k), (k, n), (m, n)))
    args = {"X_ptr": x, "W_ptr": w, "Y_ptr": y, "M_tot": m, "N_tot": n, "K_tot": k}
    for name, t in (("X", x), ("W", w), ("Y", y)):
        args.update({f"{name}_s{a}": s for a, s in enumerate(t.stride())})
    return args


def test_gemm_tiles_fit_the_operands(monkeypatch):
    """The GEMM tile cut the compile report called for: operands loaded entry by entry (rows of
    257 bf16 entries are not 16-byte aligned) get tiles of at most GEMM_SCALAR_ENTRIES entries per
    thread and K step (at 96, matmul spilled inside the K loop); aligned ones keep Hopper's largest
    tile; fp32 on FMA units gets its own tiles."""
    import torch
    from symgrad.runtime import triton_support as rt

    monkeypatch.setattr(rt, "interpreting", lambda: False)  # the compiled configs, not the interpreter's one
    entries = lambda c: (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] / (32 * c.num_warps)  # noqa: E731
    tiles = lambda cs: {rt._tile(c) for c in cs}  # noqa: E731
    bf16 = {"PREC": "ieee", "DOT_F32": False}
    odd = rt.prune_gemm_configs(rt.gemm_configs(), _gemm_nargs(257, 257, 257, torch.bfloat16), **bf16)
    assert odd and all(entries(c) <= rt.GEMM_SCALAR_ENTRIES for c in odd)
    assert (128, 256, 64, 8, 3) not in tiles(odd)
    even = rt.prune_gemm_configs(rt.gemm_configs(), _gemm_nargs(4096, 4096, 4096, torch.bfloat16), **bf16)
    assert (128, 256, 64, 8, 3) in tiles(even)
    fma = rt.prune_gemm_configs(rt.gemm_configs(), _gemm_nargs(4096, 4096, 4096, torch.float32), PREC="ieee", DOT_F32=True)
    assert tiles(fma) and tiles(fma) <= set(rt.GEMM_TILES_FMA)
    tf32 = rt.prune_gemm_configs(rt.gemm_configs(), _gemm_nargs(4096, 4096, 4096, torch.float32), PREC="tf32", DOT_F32=True)
    assert tiles(tf32) <= set(rt.GEMM_TILES) and all(c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * 4
                                                      * c.num_stages <= rt.GEMM_SMEM_BUDGET for c in tf32)


def test_gemm_index_width_counts_the_overhang():
    """A GEMM's carried offsets reach past a tensor's last entry by up to two K tiles: int32 index
    math only while that stays below 2^30."""
    import torch
    from symgrad.runtime import triton_support as rt

    w = torch.empty((4, 2**28 - 1), device="meta")  # last entry below 2^30; one K tile further along axis 0 past it
    assert not rt.wide_index(w)
    assert rt.wide_index(w, overhang=rt.GEMM_OVERHANG)
    assert not rt.wide_index(torch.empty((4096, 4096), device="meta"), overhang=rt.GEMM_OVERHANG)


@pytest.mark.parametrize("itemsize", [2, 4])
def test_norm_backward_partial_rows_stay_in_l2(itemsize):
    """Layer norm backward at 65536 columns (several blocks per row): each program re-reads its row
    (x, dy) and adds every row into its fp32 partial rows (dw, dbias). At one program per SM those
    do not fit a 50 MB L2 together and the model charges both to memory (bound under 50%); the host
    caps the programs so that they fit, below one per SM, and the bound passes 90%."""
    import torch
    from symgrad.runtime import triton_support as rt

    plan = _plan("layer_norm")
    launch = _row_launch(plan, "backward")
    sizes = {"B": 4096, "D": 65536}
    hot = sizes["D"] * (2 * itemsize + 4 * 2)  # the row x, dy and the two fp32 partial rows
    with rt.planning_for(132, 50 * 10**6):
        n_prog, rpp = rt.row_programs(sizes["B"], torch.device("meta"), True, hot, per_sm=1, partial_rows=True)
        plain, plain_rpp = rt.row_programs(sizes["B"], torch.device("meta"), True, hot, per_sm=1)
    assert n_prog * rpp >= sizes["B"] and n_prog < 132
    assert plain_rpp <= -(-sizes["B"] // 132)  # a plain re-read keeps every SM busy
    assert n_prog * hot <= rt.l2_reread_bytes(torch.device("meta"))
    capped = traffic.launch_traffic(plan, launch, sizes, itemsize, resident_programs=n_prog, programs=n_prog)
    full = traffic.launch_traffic(plan, launch, sizes, itemsize, resident_programs=132, programs=132)
    assert capped.rereads_free and capped.least / capped.total >= 0.9
    assert not full.rereads_free and full.least / full.total < 0.5
