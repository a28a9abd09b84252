"""The ``symgrad`` command line.

    symgrad list [--format text|json] [--all]
    symgrad derive OP [--format text|latex|json] [--steps]
    symgrad derive "EXPR" --wrt x[,y...] [--at x=2,y=3] [--format ...] [--steps]

Every command takes ``--ops MODULE`` (repeatable): import MODULE, from the current directory, to
register its ops; a ``[tool.symgrad]`` table in ./pyproject.toml names such modules too
(:mod:`symgrad.project`, which also decides which ops a command acts on by default).

Adding a subcommand: write ``add_<name>_parser(subparsers)`` that adds its parser and sets
``func`` (``parser.set_defaults(func=run_<name>)``, where ``run_<name>(args) -> int`` returns the
exit status), then append it to :data:`SUBCOMMANDS`. A user error raises :class:`UserError` with a
one-line message (``REGISTRY.get``'s ``KeyError`` for an unknown op counts too): ``main`` prints
``symgrad: error: ...`` on one line and exits 2. A ``DerivationError`` exits 1 the same way; any
other exception is an internal error (exit 1, one line). Nothing prints a traceback unless
``SYMGRAD_DEBUG=1`` is set.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
import time
from typing import Callable, Sequence

PROG = "symgrad"
EXIT_USER = 2  # bad command line, unknown op, unreadable expression
EXIT_ENGINE = 1  # the derivation engine refused an op (DerivationError) or failed


class UserError(Exception):
    """A mistake in the command line; its message is one line."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``symgrad: error: ...``), exit 2."""

    def error(self, message):  # noqa: D401 (argparse API)
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see `{PROG} {sub + ' ' if sub else ''}--help`)"
        raise UserError(message + hint)


# ----------------------------------------------------------------------------------------------
# symgrad list


def add_list_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list the registered ops", description="List every registered op: its doc, inputs, params and outputs.")
    p.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or one JSON object {\"ops\": [...]}")
    p.add_argument("--all", action="store_true", help="in a user project, also list symgrad's library ops")
    p.set_defaults(func=run_list)


def run_list(args) -> int:
    from . import render
    from .declare import REGISTRY

    current = _load_ops(args)
    ops = list(REGISTRY) if args.all else [REGISTRY.get(n) for n in current.default_ops()]
    if args.format == "json":
        summaries = [render.op_summary(op) for op in ops]
        _write(json.dumps({"ops": summaries}, indent=2) + "\n")
    else:
        _write(render.op_list_text(ops))
    return 0


# ----------------------------------------------------------------------------------------------
# symgrad derive


def add_derive_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "derive",
        help="derive the gradient of an op, or of a scalar expression",
        description=(
            "Derive and simplify the gradient of a registered op (symgrad derive layer_norm), or the partial "
            "derivatives of an ad-hoc scalar expression (symgrad derive 'x*sigmoid(x)' --wrt x --at x=2). "
            "A bare name is an op; anything else is an expression. An expression that starts with '-' goes "
            "after '--': symgrad derive --wrt x -- '-x**2'."
        ),
    )
    p.add_argument("target", metavar="OP|EXPR", help="a registered op name (see `symgrad list`) or a scalar expression")
    p.add_argument("--format", choices=("text", "latex", "json"), default="text", help="output format (default text)")
    p.add_argument("--steps", action="store_true", help="show the chain rule and every rewrite that fired, stage by stage")
    p.add_argument("--wrt", metavar="x[,y...]", help="expressions only: the variables to differentiate by")
    p.add_argument("--at", metavar="x=2[,y=3...]", help="expressions only: also give the values of the expression and its partials here")
    p.set_defaults(func=run_derive)


def run_derive(args) -> int:
    from . import render

    target = args.target.strip()
    if _is_name(target):
        op = _get_op(target, args)
        if args.wrt is not None or args.at is not None:
            raise UserError(f"--wrt and --at apply to expressions; {target!r} is an op (its inputs are declared)")
        from .derive import derive

        d = derive(op)
        if args.format == "json":
            _write(json.dumps(render.derivation_dict(d, args.steps), indent=2) + "\n")
        elif args.format == "latex":
            _write(render.derivation_latex(d, args.steps))
        else:
            _write(render.derivation_text(d, args.steps))
        return 0

    e = derive_expression(target, args.wrt, args.at)
    if args.format == "json":
        _write(json.dumps(render.expr_dict(e, args.steps), indent=2) + "\n")
    elif args.format == "latex":
        _write(render.expr_latex(e, args.steps))
    else:
        _write(render.expr_text(e, args.steps))
    return 0


def _is_name(text: str) -> bool:
    """A bare identifier names an op; anything else is an expression.

    Unicode identifiers count as names too, so a look-alike (Cyrillic 's' in 'softmax') is
    reported as an unknown op with the offending character, rather than as a parse error.
    """
    return text.isidentifier()


def _load_ops(args=None):
    """Register the library and the project's ops (``--ops`` and ``[tool.symgrad]``); the project."""
    from . import project

    return project.load(getattr(args, "ops_modules", None) or ())


def _get_op(name: str, args=None):
    from .declare import REGISTRY

    _load_ops(args)
    try:
        return REGISTRY.get(name)
    except KeyError as e:
        msg = e.args[0] if e.args else f"unknown op {name!r}"
        odd = [c for c in name if not c.isascii()]
        if odd:
            msg += f" (it contains the non-ASCII character {odd[0]!r}, U+{ord(odd[0]):04X})"
        close = difflib.get_close_matches(name, REGISTRY.names(), n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        raise UserError(msg) from None


@contextlib.contextmanager
def _user_errors(prefix: str = ""):
    """Reading user text: a ParseError (a ValueError) or a too-deep or too-big input is a user error."""
    try:
        yield
    except UserError:
        raise
    except RecursionError:
        raise UserError(f"{prefix}the expression nests too deeply") from None
    except (ValueError, OverflowError, MemoryError) as e:
        raise UserError(prefix + (str(e) or type(e).__name__)) from None


#: Budgets of ``derive "EXPR"`` beyond the parser's (which bound the typed text): the number of
#: ``--wrt`` variables, the written-out size of each partial derivative, and the time that
#: differentiating and simplifying may take in all. Values at ``--at`` have their own budget
#: (:mod:`symgrad.atpoint`).
MAX_WRT = 32
MAX_DERIVATIVE_NODES = 20_000
DERIVE_TIME_LIMIT_S = 10.0


class _OutOfTime(BaseException):
    """Raised by the timer inside SymPy; a BaseException so that no ``except Exception`` there eats it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise :class:`_OutOfTime` in this thread after ``seconds`` (main thread, where SIGALRM exists)."""
    import signal
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _written_size(expr, cache: dict, limit: int) -> int:
    """Node count of ``expr`` written out as a tree (what printing it costs), stopping past ``limit``."""
    size = cache.get(expr)
    if size is None:
        size = 1
        for arg in expr.args:
            size += _written_size(arg, cache, limit)
            if size > limit:
                break
        cache[expr] = size
    return size


def derive_expression(text: str, wrt: str | None, at: str | None):
    """Differentiate an ad-hoc scalar expression: ``sympy.diff``, then symgrad's rule stages.

    The text goes through :mod:`symgrad.parse` (a whitelisted grammar; nothing is evaluated as
    Python). Simplification is the same ordered, named rules the ops use, so it is predictable and
    its steps can be shown; a stage that does not settle leaves the derivative as SymPy gave it.
    """
    import sympy as sp

    from . import parse, render
    from .rewrite import RewriteError, Trace, run_stages
    from .rules.context import Context
    from .stages import GRADIENT_STAGES

    start = time.perf_counter()
    with _user_errors():
        expr = parse.parse_expression(text)
    symbols = {s.name: s for s in expr.free_symbols if isinstance(s, sp.Symbol)}
    known = ", ".join(sorted(symbols)) or "none"
    if wrt is None:
        raise UserError(f"an expression needs --wrt: the variables to differentiate by (its variables: {known})")
    with _user_errors("--wrt: "):
        names = parse.parse_names(wrt)
        for n in names:
            parse.validate_identifier(n, "--wrt variable")
    if not names:
        raise UserError("--wrt names no variable")
    if len(names) > MAX_WRT:
        raise UserError(f"--wrt names {len(names)} variables; at most {MAX_WRT} at a time")
    seen = set()
    for n in names:
        if n in seen:
            raise UserError(f"--wrt names {n!r} twice")
        seen.add(n)
        if n not in symbols:
            raise UserError(f"--wrt names {n!r}, which does not occur in the expression (its variables: {known})")
    wrt_syms = tuple(symbols[n] for n in names)

    point = None
    if at is not None:
        with _user_errors("--at: "):
            bindings = parse.parse_bindings(at)
        for n in bindings:
            if n not in symbols:
                raise UserError(f"--at names {n!r}, which does not occur in the expression (its variables: {known})")
        missing = sorted(set(symbols) - set(bindings))
        if missing:
            raise UserError(f"--at gives no value for {', '.join(repr(m) for m in missing)}")
        point = {n: sp.sympify(v) if not isinstance(v, sp.Basic) else v for n, v in bindings.items()}

    raw, grads, steps = {}, {}, {}
    sizes: dict = {}
    current = "differentiating"
    try:
        with _time_limit(DERIVE_TIME_LIMIT_S):
            for s in wrt_syms:
                current = f"differentiating by {s.name}"
                d = sp.diff(expr, s)
                if _written_size(d, sizes, MAX_DERIVATIVE_NODES) > MAX_DERIVATIVE_NODES:
                    raise UserError(f"d/d{s.name} is too large: more than {MAX_DERIVATIVE_NODES} nodes when written out")
                current = f"simplifying d/d{s.name}"
                tr = Trace()
                try:
                    g = run_stages(d, GRADIENT_STAGES, Context(op="expr"), tr)
                except RewriteError:
                    g, tr = d, Trace()
                if _written_size(g, sizes, MAX_DERIVATIVE_NODES) > MAX_DERIVATIVE_NODES:
                    raise UserError(f"d/d{s.name} is too large: more than {MAX_DERIVATIVE_NODES} nodes when written out")
                raw[s.name], grads[s.name], steps[s.name] = d, g, tr.steps
    except _OutOfTime:
        raise UserError(f"{current} took longer than {DERIVE_TIME_LIMIT_S:g} s") from None

    values = None
    if point is not None:  # numerically, at fixed precision, within a time and size budget
        from .atpoint import EvaluationError, Evaluator

        where = ",".join(f"{n}={v}" for n, v in bindings.items()) if len(at) > 60 else at.strip()
        ev = Evaluator({symbols[n]: v for n, v in point.items()})
        try:
            values = {
                "expr": ev.value(expr, f"evaluating the expression at {where}"),
                "gradients": {n: ev.value(g, f"evaluating d/d{n} at {where}") for n, g in grads.items()},
            }
        except EvaluationError as e:
            raise UserError(str(e)) from None
    return render.ExprDerivation(text, expr, wrt_syms, raw, grads, steps, point, values, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# The table of subcommands, and main


#: Each entry adds one subcommand's parser (and its ``func``). Other subcommands (``generate``,
#: ``check``) append their ``add_<name>_parser`` here.
def add_generate_parser(subparsers):
    from .generate import add_generate_parser as add

    return add(subparsers)


def add_check_parser(subparsers):
    from .check import add_check_parser as add

    return add(subparsers)


SUBCOMMANDS: list[Callable] = [add_list_parser, add_derive_parser, add_generate_parser, add_check_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROG,
        description="Derive, simplify and compile gradients of tensor ops declared in SymPy index notation.",
        epilog="`symgrad COMMAND --help` describes a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    for command in sub.choices.values():  # every command sees the user's ops the same way
        command.add_argument(
            "--ops", dest="ops_modules", action="append", default=[], metavar="MODULE",
            help="import MODULE (from the current directory) to register its ops; repeatable. "
                 "./pyproject.toml's [tool.symgrad] table can name them instead",
        )
    return parser


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _one_line(message: str, limit: int = 400) -> str:
    line = " ".join(str(message).split("\n"))
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
    sys.stderr.flush()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    debug = os.environ.get("SYMGRAD_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help, or argparse exiting by itself
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USER)
    except BrokenPipeError:  # `symgrad derive ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 (the one place that turns exceptions into messages)
        if debug:
            raise
        return _fail(*_classify(e))


def _classify(e: BaseException) -> tuple[str, int]:
    from .derive import DerivationError
    from .plan import LoweringError
    from .project import ProjectError

    if isinstance(e, (UserError, ProjectError)):
        return str(e), EXIT_USER
    if isinstance(e, (DerivationError, LoweringError)):  # the op asks for what symgrad cannot do: it says what
        return str(e), EXIT_ENGINE
    if isinstance(e, KeyError):
        return (e.args[0] if e.args else "unknown name"), EXIT_USER
    if isinstance(e, RecursionError):
        return "expression nests too deeply", EXIT_USER
    if isinstance(e, MemoryError):
        return "out of memory", EXIT_USER
    return f"internal error: {type(e).__name__}: {e} (SYMGRAD_DEBUG=1 shows the traceback)", EXIT_ENGINE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
