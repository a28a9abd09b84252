"""The NumPy target: an op's :class:`~symgrad.plan.KernelPlan` -> one NumPy reference module.

``render(plan, command)`` prints each statement with :mod:`.numpy_printer` and fills the Jinja
skeleton ``templates/numpy/module.py.j2``: the skeleton only places blocks this module computes.
The module contract (functions, constants, errors) is in :mod:`symgrad.targets`.

How the IR's kernel classes come out (every statement is evaluated over its axis space, see
:mod:`.statements`; there are no Python loops over elements):

* map: broadcast elementwise NumPy expressions;
* row reduction: ``np.sum`` / ``np.max`` over the reduced axis (``np.einsum`` when the reduced
  body is a product, e.g. layer_norm's ``sum(dy*w*xhat)``);
* contraction: ``A @ B`` (with ``.T``) for two matrices, else ``np.einsum(..., optimize=True)``
  straight on the operands;
* stencil: strided reads are re-indexed so each spans one large axis (the stride becomes a
  divisibility guard folded into the gather's index), read with ``_m.gather`` (zero-padding the
  tensor: reads outside the extent are 0) and contracted with ``np.einsum``: the im2col form.

A map statement with one-hot terms or a row mask (softmax + cross-entropy's ``dx``) is computed in
place as row scale * (dense + one-hots) (:func:`.numpy_printer.lower_row_form_lines`); a temporary
of the kernel that no later statement reads (the ``p`` that backward recomputes) may become its
result's buffer.

Dtypes: the math runs in float64 when any float input is float64, else in float32 (float16 inputs
compute in float32); outputs, saved values and gradients come back in that dtype.
"""
from __future__ import annotations

import keyword
import textwrap
from functools import lru_cache

import jinja2
import sympy as sp

from ..declare import Role
from ..functions import ReduceMax
from ..plan import KernelPlan, LoweringError, Statement
from . import declaration_file, numpy_multi
from .numpy_printer import DTYPE, Env, NumPyPrinter, lower_row_form_lines, lower_statement_lines, mask_buffers, row_form_applies
from .statements import common_subexpressions, prepare, row_form

from . import template_dir  # noqa: E402  (one template lookup, checkout or wheel)

TEMPLATE_DIR = template_dir("numpy")

# Names the generated code itself uses: no buffer, param or dim may take one.
RESERVED = frozenset({
    "np", "math", "saved", "params", "dims", "forward", "backward", "vjp", "forward_with_saved",
    "OP", "INPUTS", "DIFFERENTIABLE", "OUTPUTS", "PARAMS", "float", "abs", "True", "False", "None",
})


@lru_cache(maxsize=None)
def _template(name: str = "module.py.j2") -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    return env.get_template(name)


def render(plan: KernelPlan, command: str) -> str:
    """The source of ``generated/numpy/<op>.py``."""
    op = plan.op
    _check_names(plan)
    if op.kind == "update":
        return _render_update(plan, command)
    env = _env(plan)
    env.masks = mask_buffers(plan.forward.statements + plan.backward.statements, env)
    context = {
        "op": op.name,
        "source": declaration_file(op),
        "command": command,
        "doc": _module_doc(plan),
        "constants": _constants(plan),
        "input_args": ", ".join(plan.inputs),
        "cotangent_args": ", ".join(plan.cotangents),
        "forward_prologue": _forward_prologue(plan),
        "forward_body": _blocks(plan.forward, plan, env, set(plan.outputs) | set(plan.saved)),
        "forward_returns": _tuple([_unfolded(plan, o.name, o.dims) for o in plan.op.outputs]),
        "several_outputs": len(plan.outputs) > 1,
        "saved": _saved_dict(plan),
        "backward_prologue": _backward_prologue(plan),
        "backward_body": _blocks(plan.backward, plan, env, set(plan.backward.returns)),
        "gradients": _gradients(plan),
    }
    return _template().render(**context) + _multi_section(plan)


def _render_update(plan: KernelPlan, command: str) -> str:
    """An update rule's module: one in-place, chunked ``update()`` (:mod:`.numpy_multi`)."""
    op = plan.op
    body, hoisted, rows, _ = numpy_multi.chunk_body(plan)
    tensors = tuple(t.name for t in op.inputs if t.dims)
    scalars = [t.name for t in op.inputs if not t.dims]
    updated = {v: k for k, v in plan.updates.items()}
    return _template("update.py.j2").render(
        op=op.name, source=declaration_file(op), command=command, doc=_module_doc(plan), repr=repr,
        inputs=repr(tuple(plan.inputs)), tensors=repr(tensors), updated=repr(updated),
        params="{" + ", ".join(f"{p.name!r}: {float(p.default)!r}" for p in plan.params) + "}",
        domains=_domain_table(plan.params) if plan.params else "", chunk=numpy_multi.CHUNK, rows=max(rows, 1),
        args=", ".join(plan.inputs), tensor_args=", ".join(tensors), views=", ".join(f"{n}_" for n in tensors),
        updated_names=", ".join(updated), scalar_names=" and ".join(scalars), scalar_count=len(scalars), scalar_list=scalars,
        param_names=[p.name for p in plan.params], hoisted=hoisted, body=body,
    )


def _multi_section(plan: KernelPlan) -> str:
    """An op's ``forward_multi`` (:mod:`.numpy_multi`), or '' when its plan has no multi form."""
    if plan.multi is None:
        return ""
    op = plan.op
    tensors = tuple(t.name for t in op.inputs if t.dims)
    scalars = tuple(t.name for t in op.inputs if not t.dims)
    params = [p.name for p in plan.params]
    common = dict(
        repr=repr, tensors=tensors, scalars=scalars, outputs=list(plan.outputs), chunk=numpy_multi.CHUNK,
        param_names=params, domains=bool(plan.params), args="".join(f"{n}, " for n in plan.inputs),
    )
    if plan.multi.kind == "multi_reduce":
        rest = [*scalars, *params]
        return _template("multi.py.j2").render(
            kind="reduce", body=numpy_multi.value_lines(plan), value_args=", ".join([tensors[0], *rest]),
            call_args=lambda first: ", ".join([first, *rest]),
            least=max((d.min_size for t in op.inputs for d in t.dims[-1:]), default=0), **common)
    body, hoisted, rows, _ = numpy_multi.chunk_body(plan)
    return _template("multi.py.j2").render(
        kind="map", body=body, hoisted=hoisted, rows=max(rows, 1), tensor_args=", ".join(tensors),
        views=", ".join(f"{n}_" for n in (*tensors, *plan.outputs)), tensor_names=", ".join(f"``{n}``" for n in tensors),
        scalar_names=", ".join(f"``{n}``" for n in scalars), **common)


# ------------------------------------------------------------------------------------------------
# names


def _check_names(plan: KernelPlan) -> None:
    op = plan.op
    seen: dict[str, str] = {}
    kinds = [("buffer", n) for n in plan.buffers] + [("param", p.name) for p in plan.params] + [("dim", d.name) for d in op.dims]
    for kind, name in kinds:
        if not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED or name.startswith("_"):
            raise LoweringError(f"op {op.name}: {kind} name {name!r} cannot be a local of the generated code (reserved or not an identifier)")
        if name in seen and seen[name] != kind:
            raise LoweringError(f"op {op.name}: {name!r} names both a {seen[name]} and a {kind}")
        seen[name] = kind


def _env(plan: KernelPlan) -> Env:
    op = plan.op
    return Env(
        tensors={name: tuple(dims) for name, dims in plan.buffers.items()},
        labels={t.name for t in op.inputs if t.role is Role.LABEL},
        params={p.name for p in plan.params},
        dims={d.name for d in op.dims},
        sizes={sp.expand(d.size): d.name for d in op.dims},
        where=f"op {op.name}",
        maxes=row_maxes(plan),
    )


def row_maxes(plan: KernelPlan) -> dict:
    """Buffers the plan computes as a row max, each with the entry it is the max of: ``x - max``
    is then added first wherever they are read (exact near the max, as torch's log-softmax)."""
    return {st.target: st.expr.args[0] for k in (plan.forward, plan.backward) for st in k.statements if isinstance(st.expr, ReduceMax)}


def _reserved(plan: KernelPlan) -> set[str]:
    return set(plan.buffers) | {p.name for p in plan.params} | {d.name for d in plan.op.dims} | RESERVED


# ------------------------------------------------------------------------------------------------
# statements


def _blocks(kernel, plan: KernelPlan, env: Env, handed_out: set) -> list[str]:
    """The kernel's statement blocks. Each statement may take over the buffer of a temporary the
    kernel computed earlier and nothing reads afterwards: not one it hands out (outputs, saved
    values, gradients), and only one of the statement's own shape."""
    blocks = []
    for k, st in enumerate(kernel.statements):
        later = set().union(*(s.reads() for s in kernel.statements[k + 1:]))
        owned = {s.target for s in kernel.statements[:k]} - later - handed_out
        owned = {name for name in owned if tuple(plan.buffers[name]) == tuple(st.dims)}
        blocks.append(_statement(st, plan, env, owned))
    return blocks


def _statement(st: Statement, plan: KernelPlan, env: Env, owned=frozenset()) -> str:
    """One statement's block: its formula as a comment, then the lines computing it. ``owned``:
    buffers the statement may overwrite (temporaries of the kernel read by nothing after it)."""
    where = f"op {plan.op.name}, statement {st.target}"
    prepared = prepare(st.expr, st.indices, st.dims, _reserved(plan), env.tensors, where)
    printer = NumPyPrinter(env, prepared, where)
    shape = _tuple([d.name for d in st.dims], parens=True)
    form = row_form(prepared.expr, prepared.indices)
    if row_form_applies(printer, form, prepared.indices):
        lines = lower_row_form_lines(printer, form, st.target, prepared.indices, shape, owned)
    else:
        reps, reduced = common_subexpressions(prepared.expr, row_maxes=set(env.maxes))
        lines = lower_statement_lines(printer, reps, reduced, st.target, prepared.indices, shape)
    comment = _wrap(f"{st.formula}  [{st.kind.value}]")
    return "\n".join([*comment, *lines])


def _wrap(text: str) -> list[str]:
    lines = textwrap.wrap(text, width=96, break_long_words=False, break_on_hyphens=False)
    return [f"# {lines[0]}", *(f"#     {c}" for c in lines[1:])]


def _tuple(names, parens: bool = False) -> str:
    names = list(names)
    if len(names) == 1 and not parens:
        return names[0]
    if len(names) == 1:
        return f"({names[0]},)"
    return f"({', '.join(names)})"


# ------------------------------------------------------------------------------------------------
# prologues: arguments in, dims bound, dtypes fixed


def _size_code(expr: sp.Expr) -> str:
    """A derived dim's formula as Python over ints (``floor(a/b)`` -> ``(a)//b``)."""

    def go(e) -> str:
        if isinstance(e, sp.floor):
            num, den = sp.fraction(sp.together(e.args[0]))
            return f"({go(num)})//{atom(den)}" if den != 1 else go(num)
        if e.is_Add:
            out = ""
            for t in e.as_ordered_terms():
                neg = t.could_extract_minus_sign()
                code = go(-t if neg else t)
                out += (" - " if neg else " + ") + code if out else ("-" + code if neg else code)
            return out
        if e.is_Mul:
            coeff, rest = e.as_coeff_Mul()
            factors = [atom(f) for f in sp.Mul.make_args(rest)]
            if coeff == -1:
                return "-" + "*".join(factors)
            return "*".join(([str(coeff)] if coeff != 1 else []) + factors)
        if e.is_Integer or e.is_Symbol:
            return str(e)
        raise LoweringError(f"cannot compute a dim from {e}")

    def atom(e) -> str:
        code = go(e)
        return code if (e.is_Symbol or e.is_Integer and e >= 0) else f"({code})"

    return go(expr)


def _forward_prologue(plan: KernelPlan) -> str:
    op = plan.op
    lines = ["params = _m.bind_params(OP, PARAMS, _INTEGER_PARAMS, params)"]
    if plan.params:
        lines.append("_m.check_params(OP, params, _PARAM_DOMAINS)")
        names = [p.name for p in plan.params]
        lines.append(f"{', '.join(names)} = {', '.join(f'params[{n!r}]' for n in names)}")
    floats = []
    for t in op.inputs:
        if t.role is Role.LABEL:
            lines.append(f"{t.name} = _m.label_array(OP, {t.name!r}, {t.name})")
        else:
            lines.append(f"{t.name} = _m.float_array(OP, 'input {t.name}', {t.name})")
            floats.append(t.name)
    lines.append(f"dims = _m.bind_dims(OP, {{{', '.join(f'{t.name!r}: {t.name}' for t in op.inputs)}}}, _INPUT_DIMS)")
    given = [s.dim.name for s in plan.dims if s.formula is None]
    lines.append(f"{', '.join(given)} = {', '.join(f'dims[{n!r}]' for n in given)}")
    least = {s.dim.name: s.dim.least for s in plan.dims if s.formula is None and s.dim.min_size}
    if least:  # dims may be empty unless declared otherwise; derived dims check themselves
        lines.append(f"_m.check_sizes(OP, dims, {least!r})")
    for fact in op.facts:  # labels in range, as torch checks them: an error, never a loss
        lines.append(f"_m.check_labels(OP, {fact.label!r}, {fact.label}, {fact.dim.name}, {fact.ignore or 'None'})")
    for s in plan.dims:
        if s.formula is not None:
            code = _size_code(s.formula)
            lines.append(f"{s.dim.name} = _m.derived_dim(OP, {s.dim.name!r}, {sp.sstr(s.formula)!r}, lambda: {code})")
    lead = [op.tensor(n) for n in plan.leading_inputs]
    if lead:
        names = ", ".join(t.name for t in lead)
        values = ", ".join(f"{t.name!r}: {t.name}" for t in lead)
        ranks = ", ".join(f"{t.name!r}: {len(t.dims)}" for t in lead)
        # leading axes fold into the op's first dim (torch's [*, D]); dims are read after folding
        lines.insert(next(k for k, ln in enumerate(lines) if ln.startswith("dims = ")),
                     f"_lead, ({names},) = _m.fold(OP, {{{values}}}, {{{ranks}}})")
    lines.append(f"{DTYPE} = _m.float_dtype({', '.join(floats)})")
    lines += [f"{n} = {n}.astype({DTYPE}, copy=False)" for n in floats]
    return "\n".join(lines)


def _unfolded(plan: KernelPlan, name: str, dims) -> str:
    return f"_m.unfold({name}, _lead)" if plan.leading_inputs and dims and dims[0].leading else name


def _saved_dict(plan: KernelPlan) -> str:
    names = list(plan.saved) + [p.name for p in plan.params] + [d.name for d in plan.op.dims]
    lead = ["'_lead': _lead"] if plan.leading_inputs else []
    return "{" + ", ".join([f"{n!r}: {n}" for n in names] + lead) + "}"


def _backward_prologue(plan: KernelPlan) -> str:
    op = plan.op
    lines = []
    groups = [list(plan.saved), [p.name for p in plan.params], [d.name for d in op.dims]]
    for names in groups:
        if names:
            lines.append(f"{', '.join(names)} = {', '.join(f'saved[{n!r}]' for n in names)}")
    labels = {t.name for t in op.inputs if t.role is Role.LABEL}
    floats = [n for n in plan.saved if n not in labels] + list(plan.cotangents)
    lines += [f"{c} = _m.float_array(OP, 'cotangent {c}', {c}, weak=True)" for c in plan.cotangents]
    lines.append(f"{DTYPE} = _m.float_dtype({', '.join(floats)})")
    if plan.leading_inputs:
        lines.append("_lead = saved['_lead']")
    for cot, out in zip(plan.cotangents, op.outputs):
        if out.name in plan.leading_outputs:
            trailing = "".join(f"{d.name}, " for d in out.dims[1:])
            lines.append(f"{cot} = _m.fold_like(OP, {cot!r}, np.asarray({cot}), _lead, ({trailing}))")
        names = tuple(d.name for d in out.dims)
        lines.append(f"{cot} = _m.check_shape(OP, {cot!r}, {cot}, {names!r}, {_tuple(names, parens=True) if names else '()'}, {DTYPE})")
    return "\n".join(lines)


def _gradients(plan: KernelPlan) -> str:
    grads = {g[1:]: g for g in plan.backward.returns}
    dims = {t.name: t.dims for t in plan.op.inputs}
    return _tuple([_unfolded(plan, grads[n], dims[n]) if n in grads else "None" for n in plan.inputs], parens=True)


# ------------------------------------------------------------------------------------------------
# constants and documentation


def _constants(plan: KernelPlan) -> str:
    op = plan.op
    params = "{" + ", ".join(f"{p.name!r}: {int(p.default) if p.integer else float(p.default)!r}" for p in plan.params) + "}"
    integer = tuple(p.name for p in plan.params if p.integer)
    input_dims = "{" + ", ".join(f"{t.name!r}: {tuple(d.name for d in t.dims)!r}" for t in op.inputs) + "}"
    return "\n".join([
        f"OP = {op.name!r}",
        f"INPUTS = {tuple(plan.inputs)!r}",
        f"DIFFERENTIABLE = {tuple(plan.differentiable)!r}",
        f"OUTPUTS = {tuple(plan.outputs)!r}",
        f"PARAMS = {params}",
        "",
        f"_INTEGER_PARAMS = {integer!r}",
        *([_domain_table(plan.params)] if plan.params else []),
        f"_INPUT_DIMS = {input_dims}  # input -> its dims, in declaration order",
    ])


def _domain_table(params) -> str:
    """Each param's declared domain, as :func:`symgrad.runtime.domains.check_params` reads it."""
    rows = ", ".join(f"{p.name!r}: {p.domain.literal(p.integer)}" for p in params)
    return f"_PARAM_DOMAINS = {{{rows}}}  # param -> (low, high, low closed, high closed, domain)"


def _module_doc(plan: KernelPlan) -> str:
    op = plan.op

    def shape(name, dims):
        return f"{name}[{', '.join(d.name for d in dims)}]" if dims else name

    lines = [f"{op.name}: {op.doc}.", "", "Inputs:"]
    for t in op.inputs:
        lines.append(f"    {shape(t.name, t.dims)}  ({t.role.value})")
    if plan.params:
        lines.append("Params:")
        for p in plan.params:
            lines.append(f"    {p.name} = {p.default!r}, {p.domain.text(p.integer)}" + (f"  ({p.doc})" if p.doc else ""))
    lines.append("Outputs:")
    for o in op.outputs:
        lines.append(f"    {shape(o.name, o.dims)}")
    if op.kind == "update":
        lines.append("Updated in place: " + ", ".join(f"{t} <- {o}" for o, t in plan.updates.items()) + ".")
    else:
        lines.append(f"Saved for backward: {', '.join(plan.saved) or 'nothing'} (and every param and dim).")
    return "\n".join(line.rstrip() for line in lines).replace('"""', "'''").replace("\\", "\\\\")
