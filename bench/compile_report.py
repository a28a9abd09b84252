"""Ahead-of-time compile report: every generated Triton kernel, compiled for sm_90 and sm_80 without a GPU.

The generated host code runs on ``meta`` tensors under ``triton_support.planning_for(SMs)``; each
launch it makes is recorded instead of run (grid, block sizes, warps, stages: the host's own
choices, nothing restated here), then compiled with ``triton.compile`` for a ``GPUTarget`` and
assembled by the ptxas that Triton itself uses. Per launch and architecture it prints:

- ``regs``: registers per thread; ``spill``: spill stores + loads in bytes (ptxas -v);
- ``loop spills``: local-memory instructions (``LDL``/``STL``) inside loops of the SASS
  (a loop being a backward branch; ``nvdisasm`` from the Triton wheel);
- ``smem``: shared memory per CTA (Triton's and ptxas' static); ``CTAs/SM``: resident CTAs per SM
  from registers, shared memory and threads (the occupancy rules of the architecture);
- ``v4 ld/st``: the share of global loads and stores (``ld.global``/``st.global``/``cp.async``
  in the PTX) that move 128 bits;
- ``tc``: tensor-core instructions (``wgmma``, ``mma``) in the PTX;
- ``bytes``/``least``/``bound``: global-memory bytes from the kernel plan's bytes model
  (``symgrad/traffic.py``) against the least a fused kernel moves, as the fraction of HBM
  bandwidth the launch can reach at best (a re-read of a row is free only when the rows in
  flight fit in L2).

Update rules and ops with a multi-tensor form (``KernelPlan.multi``: clipping, activations) are
recorded too (direction ``multi``): one step or ``forward_multi`` over three tensors of the op's
entries, a third of them and one; a reduction's two launches are both shown (stage two reads the
fp32 partial values of stage one).

Per op and dtype it adds the forward, backward and forward+backward bounds. Writes
``bench/results/compile-sm90.json`` (Triton and ptxas versions, every launch, both architectures).

    python bench/compile_report.py                              # every op at the benchmark shapes
    python bench/compile_report.py --ops layer_norm --dtypes bfloat16
    python bench/compile_report.py --small --arch 90            # the CI shape set (tests/test_compile_report.py)
    python bench/compile_report.py --ops myop --project-ops userops   # a user's op (as symgrad --ops)
    python bench/compile_report.py --compare before.json after.json [sm_90]  # markdown, launch by launch

Exit status 1 when a kernel fails to compile or spills inside a loop.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_report: unset TRITON_INTERPRET (the report compiles kernels; it never runs them)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Last on the path: a user project's folder (which symgrad.project puts first) must win, so that
# its `generated` package is the one imported; the checkout's serves the library's ops.
sys.path.append(str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from symgrad import project as _project  # noqa: E402
from symgrad import traffic  # noqa: E402
from symgrad.declare import REGISTRY, Role  # noqa: E402
from symgrad.derive import derive  # noqa: E402
from symgrad.plan import lower  # noqa: E402
from symgrad.runtime import triton_support as _rt  # noqa: E402

from bench_triton import CASES, params_for  # noqa: E402

# The GPUs each architecture is reported for: SMs, and the per-SM limits occupancy follows.
ARCHS = {
    90: dict(gpu="H100/H200", sms=132, regs=65536, threads=2048, ctas=32, smem=228 * 1024, smem_cta=227 * 1024, l2=50 * 10**6),
    80: dict(gpu="A100", sms=108, regs=65536, threads=2048, ctas=32, smem=164 * 1024, smem_cta=163 * 1024, l2=40 * 10**6),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "float64": torch.float64}
ODD = 11001  # an odd row width (not a multiple of 8): where two-index addressing loses 128-bit loads
SMALL = 257  # the CI shape set: odd, one block wide enough to exercise vector accesses


# ---------------------------------------------------------------------------------------------
# what the host code launches


@dataclass
class Launch:
    op: str
    dtype: str
    direction: str  # forward / backward
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    configs: list = field(default_factory=lambda: [{}])  # autotuned kernels: every config
    entries: int | None = None  # a multi-tensor launch: the entries it covers (all tensors together)
    entry_bytes: int | None = None  # and their bytes per entry (a reduction's stage two: fp32 values)

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


def shapes(op, small: bool) -> dict:
    """The sizes of an op's dims: the benchmark's (bench/bench_triton.py) where it has the op,
    otherwise 4096 rows and an odd width of 11001 for the op's last dim (the CI set: 257)."""
    for name, full, smoke, _ in CASES:
        if name == op.name:
            if small:
                return dict(smoke)
            return dict(full)
    last = op.inputs[0].dims[-1].name if op.inputs[0].dims else None
    return {d.name: (SMALL if small else (ODD if d.name == last else 4096)) for d in op.dims}


def cases(ops, dtypes, small: bool, override=None):
    if override:
        for name in ops:
            for dt in dtypes:
                yield name, {**shapes(REGISTRY.get(name), small), **override}, dt
        return
    seen = set()  # (op, sizes, dtype): an op may have several benchmark shapes (cross-entropy has two)
    for name, full, smoke, case_dtypes in CASES:
        if name in ops:
            sizes = dict(smoke) if small else dict(full)
            for dt in case_dtypes:
                key = (name, tuple(sorted(sizes.items())), dt)
                if dt in dtypes and key not in seen:
                    seen.add(key)
                    yield name, sizes, dt
    for name in ops:
        if not any(c[0] == name for c in CASES):
            for dt in dtypes:
                yield name, shapes(REGISTRY.get(name), small), dt


def record(op_name: str, sizes: dict, dtype, sms: int, l2: int | None = None) -> list:
    """The launches the generated host code makes for forward and backward at ``sizes``."""
    op = REGISTRY.get(op_name)
    module = importlib.import_module(_project.modules_for(op_name)["triton"])
    launches: list = []
    direction = ["forward"]

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(op_name, str(dtype).replace("torch.", ""), direction[0], self, args, kwargs, tuple(grid)))

    def tuned_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        named = dict(zip(self.arg_names, args))
        self.nargs = named  # what prune_configs reads, as Autotuner.run sets it
        configs = [dict(c.all_kwargs()) for c in self.prune_configs(kwargs)]
        self.nargs = None
        grids = []
        for c in configs:
            meta = {**named, **kwargs, **c}
            grids.append(tuple(grid(meta)) if callable(grid) else tuple(grid))
        launches.append(Launch(op_name, str(dtype).replace("torch.", ""), direction[0], self.fn, args, kwargs, grids[0], configs))

    inputs = []
    for t in op.inputs:
        shape = tuple(int(sizes[d.name]) for d in t.dims)
        inputs.append(torch.empty(shape, dtype=torch.int64 if t.role is Role.LABEL else dtype, device="meta"))
    params = {k: v for k, v in params_for(op, sizes).items()}
    saved_run, saved_tuned = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        with _rt.planning_for(sms, l2):
            if op.kind == "op":
                outs, saved = module.forward_with_saved(*inputs, **params)
                outs = outs if isinstance(outs, tuple) else (outs,)
                direction[0] = "backward"
                module.backward(saved, *(torch.empty_like(o) for o in outs))
            # multi-tensor kernels take float32, float16 and bfloat16 lists (float64: a TypeError)
            if (op.kind == "update" or hasattr(module, "MULTI")) and dtype != torch.float64:
                direction[0] = "multi"
                _record_multi(op, module, inputs, params, launches)
    finally:
        JITFunction.run, Autotuner.run = saved_run, saved_tuned
    return launches


def _record_multi(op, module, inputs, params, launches: list) -> None:
    """The multi-tensor launches (an update rule's step, an op's ``forward_multi``) over three
    tensors of different sizes: the op's inputs' entries, a third of them, and one."""
    first = next(t for t in inputs if t.dim())
    n = first.numel()
    sizes = [n, n // 3 + 1, 1]
    lists, scalars = [], []
    for t, x in zip(op.inputs, inputs):
        if t.dims:
            lists.append([torch.empty(k, dtype=x.dtype, device="meta") for k in sizes])
        else:
            scalars.append(torch.empty((), dtype=torch.float32, device="meta"))
    args = [lists.pop(0) if t.dims else scalars.pop(0) for t in op.inputs]
    start = len(launches)
    if op.kind == "update":
        module.update(*args, **{p.name: params.get(p.name, p.default) for p in op.params})
    else:
        module.forward_multi(*args, **{k: v for k, v in params.items() if k in module.PARAMS})
    stage_one = 0
    for k, launch in enumerate(launches[start:]):
        programs = math.prod(launch.grid)
        last = k == len(launches) - start - 1
        if launch.name == "_multi_reduce" and last:  # stage two: one program over the partial values
            launch.entries, launch.entry_bytes = stage_one, 4
        else:
            launch.entries, launch.entry_bytes = sum(sizes), first.element_size()
            stage_one += programs


# ---------------------------------------------------------------------------------------------
# compiling one launch


def _tool(name: str, arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        return nv.get_ptxas(arch).path
    return str(Path(nv.__file__).parent / "bin" / name)


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return next((ln for ln in reversed(out) if "Build" in ln or "release" in ln), out[-1] if out else "?")


_COMPILED: dict = {}


def compile_launch(launch: Launch, config: dict, arch: int):
    """``triton.compile`` of the launch's kernel at its arguments, as ``JITFunction.run`` would."""
    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **config}
    for k in ("pre_hook", "post_hook"):
        kwargs.pop(k, None)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.fn.__module__, fn.fn.__qualname__, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    if key not in _COMPILED:
        _COMPILED[key] = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return _COMPILED[key], constexprs, signature


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_GLOBAL = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s", re.M)
# the copy size is decimal or hex (Triton's inline asm writes ``0x10``)
_CPASYNC = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.(?:ca|cg)\.shared(?:::cta)?\.global[^\n]*?,\s*(0x[0-9a-fA-F]+|\d+)\s*(?:,|;)", re.M)
_BULK = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk", re.M)
_TC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(wgmma\.mma_async|mma\.sync)", re.M)
# integer div/rem (index math) and its divisor: an immediate one ptxas turns into a multiply-shift
_INTDIV = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:div|rem)\.[su](32|64)\s[^;]*,\s*(-?%?\w+)\s*;", re.M)


def ptxas_info(ptx: str, arch: int) -> dict:
    """Registers, spills and static shared memory from ``ptxas -v`` (Triton's flags)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([_tool("ptxas", arch), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                            str(src), "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {log.strip().splitlines()[-1] if log.strip() else r.returncode}")
    spill = _PTXAS_LINE.search(log)
    return dict(regs=int(_REGS.search(log).group(1)), stack=int(spill.group(1)),
                spill_bytes=int(spill.group(2)) + int(spill.group(3)),
                ptxas_smem=int(m.group(1)) if (m := _SMEM.search(log)) else 0)


def loop_spills(cubin: bytes) -> int:
    """Local-memory instructions (LDL/STL: spills) inside loops of the SASS; a loop is the
    address range from a backward branch's target to the branch."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        sass = subprocess.run([_tool("nvdisasm", 90), "-c", str(f)], capture_output=True, text=True).stdout
    labels: dict = {}
    insts: list = []
    addr = None
    for line in sass.splitlines():
        if m := re.match(r"^(\.L_x_\d+):", line.strip()):
            labels[m.group(1)] = len(insts)
            continue
        if m := re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
            addr = int(m.group(1), 16)
            insts.append((addr, m.group(2)))
    local = [i for i, (_, text) in enumerate(insts) if re.search(r"\b(LDL|STL)\b", text)]
    if not local:
        return 0
    loops = []
    for i, (_, text) in enumerate(insts):
        if m := re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text):
            start = labels.get(m.group(1))
            if start is not None and start <= i:
                loops.append((start, i))
    return sum(1 for i in local if any(a <= i <= b for a, b in loops))


def ptx_accesses(ptx: str) -> dict:
    """Global loads and stores in the PTX and how many move 128 bits; tensor-core instructions."""
    counts = {"ld": [0, 0], "st": [0, 0]}
    for kind, mods in _GLOBAL.findall(ptx):
        parts = mods.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfus]\d+", p)), 32)
        counts[kind][0] += 1
        counts[kind][1] += vec * bits >= 128
    for size in _CPASYNC.findall(ptx):
        counts["ld"][0] += 1
        counts["ld"][1] += int(size, 0) >= 16
    bulk = len(_BULK.findall(ptx))  # TMA: whole tiles, at least 128 bits
    counts["ld"][0] += bulk
    counts["ld"][1] += bulk
    tc = _TC.findall(ptx)
    divs = _INTDIV.findall(ptx)
    return dict(loads=counts["ld"][0], loads_v4=counts["ld"][1], stores=counts["st"][0], stores_v4=counts["st"][1],
                tensor_core=len(tc), tensor_core_kind=sorted(set(tc)),
                div_rem_64=sum(b == "64" for b, _ in divs), div_rem_32=sum(b == "32" for b, _ in divs),
                div_rem_by_constant=sum(not d.startswith("%") for _, d in divs))


def occupancy(arch: int, regs: int, smem: int, warps: int) -> int:
    """Resident CTAs per SM: registers (allocated per warp in units of 256), shared memory
    (plus 1 KB a CTA reserves), threads and the CTA cap of the architecture."""
    a = ARCHS[arch]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (a["regs"] // per_warp) // warps if per_warp else a["ctas"]
    by_smem = a["smem"] // (smem + 1024) if smem else a["ctas"]
    by_threads = a["threads"] // (32 * warps)
    return max(0, min(by_regs, by_smem, by_threads, a["ctas"])) if smem <= a["smem_cta"] else 0


def analyse(launch: Launch, config: dict, arch: int) -> dict:
    try:
        k, constexprs, signature = compile_launch(launch, config, arch)
        ptx = k.asm["ptx"]
        info = ptxas_info(ptx, arch)
    except Exception as e:  # a compile error is a result the report shows (and fails on)
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300])
    warps = k.metadata.num_warps
    smem = max(k.metadata.shared, info["ptxas_smem"])
    res = dict(info, num_warps=warps, num_stages=k.metadata.num_stages, smem=smem,
               loop_spills=loop_spills(k.asm["cubin"]), ctas_per_sm=occupancy(arch, info["regs"], smem, warps))
    res.update(ptx_accesses(ptx))
    return res


# ---------------------------------------------------------------------------------------------
# the bytes model per launch (the plan's launch the generated kernel prints)


_NAME = re.compile(r"^_(for|bac)(\d+)_")
_MULTI = ("_update", "_multi_map", "_multi_reduce")


def plan_launch(plan, name: str):
    if name in _MULTI:
        return plan.multi
    m = _NAME.match(name)
    if not m:
        return None
    kernel = plan.forward if m.group(1) == "for" else plan.backward
    i = int(m.group(2))
    return kernel.launches[i] if i < len(kernel.launches) else None


def report_case(op_name, sizes, dtype_name, archs, plans) -> tuple[list, dict]:
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if op_name not in plans:
        plans[op_name] = lower(derive(REGISTRY.get(op_name)))
    plan = plans[op_name]
    sizes = traffic.all_sizes(plan, sizes, params_for(REGISTRY.get(op_name), sizes))
    rows = []
    by_arch: dict = {}
    for arch in archs:
        spec = ARCHS[arch]
        launches = record(op_name, sizes, dtype, spec["sms"], spec["l2"])
        seen_plan = set()
        for launch in launches:
            for config in launch.configs:
                res = analyse(launch, config, arch)
                row = dict(op=op_name, dtype=dtype_name, sizes=sizes, direction=launch.direction, kernel=launch.name,
                           arch=f"sm_{arch}", grid=list(launch.grid),
                           constexprs={k: v for k, v in {**launch.kwargs, **config}.items()
                                       if isinstance(v, (int, bool, str)) and k not in ("pre_hook", "post_hook")},
                           **res)
                pl = plan_launch(plan, launch.name)
                if pl is not None and "error" not in res and not launch.name.endswith("_finish"):
                    programs = math.prod(launch.grid)
                    resident = min(programs, spec["sms"] * max(res["ctas_per_sm"], 1))
                    single = bool({**launch.kwargs, **config}.get("SINGLE_BLOCK", False))
                    if launch.entries is not None:
                        t = traffic.multi_traffic(plan, launch.entries, launch.entry_bytes, programs)
                    else:
                        t = traffic.launch_traffic(plan, pl, sizes, itemsize, single_block=single,
                                                   resident_programs=resident, programs=programs, l2_bytes=spec["l2"])
                    row.update(bytes=t.total, least=t.least, passes=t.passes, rereads_free=t.rereads_free,
                               bound=round(t.least / t.total, 3) if t.total else 1.0, plan_kind=pl.kind)
                    key = (launch.direction, id(pl))
                    if key not in seen_plan:
                        seen_plan.add(key)
                        acc = by_arch.setdefault(arch, {"forward": 0, "backward": 0})
                        if launch.direction in acc:  # multi-tensor launches are rows of their own
                            acc[launch.direction] += t.total
                rows.append(row)
    least = traffic.minimum_bytes(plan, sizes, itemsize)
    bounds = {}
    for arch, acc in by_arch.items():
        both = acc["forward"] + acc["backward"]
        bounds[f"sm_{arch}"] = dict(
            forward=round(least["forward"] / acc["forward"], 3) if acc["forward"] else None,
            backward=round(least["backward"] / acc["backward"], 3) if acc["backward"] else None,
            both=round(least["both"] / both, 3) if both else None,
            bytes=dict(acc), least=least)
    return rows, bounds


_PLANS: dict = {}


def _run_case(job):
    (op_name, sizes, dt), archs = job
    return report_case(op_name, sizes, dt, archs, _PLANS)


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items):
        return map(fn, items)


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000


def print_table(rows, summary):
    head = f"{'op':22} {'dtype':8} {'kernel':20} {'arch':5} {'warps':>5} {'regs':>4} {'spill':>6} {'loopsp':>6} {'smem':>7} {'CTA/SM':>6} {'v4 ld':>7} {'v4 st':>7} {'tc':>4} {'bytes':>8} {'least':>8} {'bound':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:22} {r['dtype']:8} {r['kernel']:20} {r['arch']:5} COMPILE ERROR: {r['error']}")
            continue
        share = lambda a, b: f"{a}/{b}" if b else "-"  # noqa: E731
        print(f"{r['op']:22} {r['dtype']:8} {r['kernel']:20} {r['arch']:5} {r['num_warps']:>5} {r['regs']:>4} "
              f"{r['spill_bytes']:>6} {r['loop_spills']:>6} {r['smem']:>7} {r['ctas_per_sm']:>6} "
              f"{share(r['loads_v4'], r['loads']):>7} {share(r['stores_v4'], r['stores']):>7} {r['tensor_core']:>4} "
              f"{fmt_bytes(r.get('bytes')):>8} {fmt_bytes(r.get('least')):>8} "
              f"{(format(r['bound'], '.0%') if 'bound' in r else '-'):>5}")
    print()
    print(f"{'op':22} {'dtype':8} {'sizes':40} {'arch':5} {'fwd':>5} {'bwd':>5} {'fwd+bwd':>7}")
    for s in summary:
        for arch, b in s["bounds"].items():
            pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
            sizes = ",".join(f"{k}={v}" for k, v in s["sizes"].items())
            print(f"{s['op']:22} {s['dtype']:8} {sizes[:40]:40} {arch:5} {pct(b['forward']):>5} {pct(b['backward']):>5} {pct(b['both']):>7}")


def _shape(r) -> str:
    return f"{r['op']} " + ",".join(f"{k}={v}" for k, v in r["sizes"].items() if k.isalpha() and k[0].isupper() and len(k) <= 4)


def compare(before_path: str, after_path: str, arch: str = "sm_90") -> str:
    """A markdown table of every launch in two reports (before -> after) on one architecture."""
    def index(path):
        doc = json.loads(Path(path).read_text())
        out = {}
        for r in doc["launches"]:
            if r["arch"] == arch:
                out.setdefault((_shape(r), r["dtype"], r["direction"], r["kernel"]), []).append(r)
        bounds = {(_shape(s), s["dtype"]): s["bounds"].get(arch) for s in doc["ops"]}
        return out, bounds

    (b, bb), (a, ab) = index(before_path), index(after_path)

    def cell(rs, key, fmt=str):
        if not rs:
            return "-"
        if any("error" in r for r in rs):
            return "error"
        vals = sorted({fmt(r[key]) for r in rs if key in r})
        return "/".join(vals) if vals else "-"

    def share(rs):
        if not rs or any("error" in r for r in rs):
            return "-"
        return "/".join(sorted({f"{r['loads_v4']}:{r['loads']}" for r in rs}))

    def both(x, y):
        return x if x == y else f"{x} -> {y}"

    lines = [f"| op | dtype | kernel | regs | spill B | loop spills | v4 loads | tensor-core | bound |",
             "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for key in sorted(set(b) | set(a), key=lambda k: (k[0], k[1], k[2] != "forward", k[3])):
        rb, ra = b.get(key, []), a.get(key, [])
        pct = lambda v: f"{v:.0%}"  # noqa: E731
        lines.append("| " + " | ".join([key[0], key[1], key[3],
                                        both(cell(rb, "regs"), cell(ra, "regs")),
                                        both(cell(rb, "spill_bytes"), cell(ra, "spill_bytes")),
                                        both(cell(rb, "loop_spills"), cell(ra, "loop_spills")),
                                        both(share(rb), share(ra)),
                                        both(cell(rb, "tensor_core"), cell(ra, "tensor_core")),
                                        both(cell(rb, "bound", pct), cell(ra, "bound", pct))]) + " |")
    lines += ["", "| op | dtype | fwd | bwd | fwd+bwd |", "|---|---|---:|---:|---:|"]
    for key in sorted(set(bb) | set(ab)):
        x, y = bb.get(key) or {}, ab.get(key) or {}
        f = lambda d, k: "-" if d.get(k) is None else f"{d[k]:.0%}"  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(both(f(x, k), f(y, k)) for k in ("forward", "backward", "both")) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--compare"]:
        argv = sys.argv[1:]
    if argv and argv[0] == "--compare":
        if len(argv) < 3:
            sys.exit("usage: compile_report.py --compare BEFORE.json AFTER.json [sm_90|sm_80]")
        print(compare(*argv[1:4]), end="")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", help="comma-separated op names (default: every op of the run)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (90, 80)")
    ap.add_argument("--small", action="store_true", help="the CI shape set (tiny benchmark shapes, width 257)")
    ap.add_argument("--json", default=None, help="where to write the JSON (default bench/results/compile-sm90.json; '-' for none)")
    ap.add_argument("--sizes", help="dim sizes overriding the benchmark's, e.g. B=4097,C=11001")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases compiled side by side (default: the CPU count)")
    ap.add_argument("--project-ops", action="append", default=[], metavar="MODULE",
                    help="a module of user ops, as symgrad's --ops (repeatable)")
    args = ap.parse_args(argv)
    proj = _project.load(tuple(args.project_ops))
    names = args.ops.split(",") if args.ops else (list(proj.ops) if proj.is_user else REGISTRY.names())
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        ap.error(f"unknown op(s): {', '.join(unknown)}")
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s): {', '.join(bad)} (choose from {', '.join(DTYPES)})")
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        ap.error(f"--arch takes compute capabilities like 90,80; got {args.arch!r}")
    if any(a not in ARCHS for a in archs):
        ap.error(f"--arch: supported are {', '.join(map(str, ARCHS))}")

    override = {}
    for item in (args.sizes.split(",") if args.sizes else []):
        k, _, v = item.partition("=")
        if not v.strip().isdigit():
            ap.error(f"--sizes takes NAME=INT pairs separated by commas; got {item!r}")
        override[k.strip()] = int(v)
    rows, summary = [], []
    todo = list(cases(names, dtypes, args.small, override))
    # One case per worker process (forked: the op registry and modules come along); compiling is
    # CPU-bound and single-threaded in Triton, so cases run side by side on the cores there are.
    jobs = max(1, min(args.jobs, len(todo)))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs) if jobs > 1 else _Serial() as pool:
        for (op_name, sizes, dt), (r, bounds) in zip(todo, pool.imap(_run_case, [(c, archs) for c in todo])):
            print(f"compiled {op_name} {dt} {sizes}", file=sys.stderr, flush=True)
            rows.extend(r)
            summary.append(dict(op=op_name, dtype=dt, sizes=sizes, bounds=bounds))
    print_table(rows, summary)

    failures = [r for r in rows if "error" in r or r.get("loop_spills")]
    out = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        triton=triton.__version__, torch=torch.__version__,
        ptxas={f"sm_{a}": tool_version(_tool("ptxas", a)) for a in archs},
        archs={f"sm_{a}": ARCHS[a] for a in archs},
        shapes="small (CI)" if args.small else "benchmark",
        note="predicted from compilation, not measured: no GPU ran these kernels",
        launches=rows, ops=summary,
        failures=[f"{r['op']} {r['dtype']} {r['kernel']} {r['arch']}: {r.get('error') or str(r['loop_spills']) + ' spill instructions in loops'}"
                  for r in failures],
    )
    path = args.json or ("-" if (args.small or args.ops) else str(ROOT / "bench" / "results" / "compile-sm90.json"))
    if path != "-":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=1, sort_keys=True, default=str) + "\n")
        print(f"\nwrote {path}")
    for f in out["failures"]:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
