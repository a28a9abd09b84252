"""Compose registered ops into a small graph and differentiate it by chaining generated modules.

A model is declared once, symbolically, as a graph of registered ops::

    g = Graph()
    X, y = g.input("X"), g.input("y")
    W1, b1, W2, b2 = g.param("W1"), g.param("b1"), g.param("W2"), g.param("b2")
    a1 = g.op("relu", g.op("linear", X, W1, b1))
    loss = g.op("softmax_cross_entropy", g.op("linear", a1, W2, b2), y, eps=0.0)

    values = g.forward({"X": ..., "y": ..., "W1": ..., ...})          # every value, by name
    loss_value, grads = g.value_and_grad({...}, wrt=["W1", "b1", "W2", "b2"])

Nothing here computes math: each node calls its op's generated module
(``generated.<target>.<op>``: ``forward_with_saved`` on the way in, ``backward`` on the way back,
in reverse topological order). A tensor read by several nodes gets the sum of their gradients;
``None`` gradients (integer labels, constants) are skipped. The graph code only uses ``+`` on
arrays, so the same graph runs on NumPy arrays (``target="numpy"``) and on torch tensors
(``target="triton"``).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterable, Mapping

from .targets import REPO_ROOT, library_package

__all__ = ["Graph", "Value", "Node", "Tape", "GraphError", "TARGETS", "load_module"]

#: Target name -> package holding one generated module per op: the library's generated modules,
#: ``generated.<target>`` in a checkout, ``symgrad.generated.<target>`` once installed.
TARGETS = {name: f"{library_package()}.{name}" for name in ("numpy", "triton")}


class GraphError(ValueError):
    """A graph is malformed or was given the wrong values; the message says which node or name."""


def _registry():
    from .declare import REGISTRY
    from . import ops  # noqa: F401  (importing the op library registers every op)

    return REGISTRY


def _package(target: str) -> str:
    if target in TARGETS:
        return TARGETS[target]
    if "." in target:  # an explicit package path, e.g. a test double or another generated tree
        return target
    raise GraphError(f"unknown target {target!r}; known targets: {sorted(TARGETS)} (or a dotted package path)")


_MODULES: dict[tuple[str, str], ModuleType] = {}


def load_module(op: str, target: str = "numpy") -> ModuleType:
    """The generated module of ``op`` for ``target``, imported once and cached."""
    key = (target, op)
    if key not in _MODULES:
        name = f"{_package(target)}.{op}"
        if name.split(".")[0] == "generated" and library_package() == "generated" and str(REPO_ROOT) not in sys.path:
            sys.path.append(str(REPO_ROOT))  # a checkout: its top-level generated/ (an editable install maps only symgrad)
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and not (name == e.name or name.startswith(e.name + ".")):
                raise  # the module exists but one of its own imports (numpy, triton, torch) is missing
            how = f" (`symgrad generate {op} --target {target}`)" if target in TARGETS else ""
            raise GraphError(f"no generated module {name!r} for op {op!r}; generate it{how}") from e
        for const in ("INPUTS", "OUTPUTS", "PARAMS", "DIFFERENTIABLE"):
            if not hasattr(module, const):
                raise GraphError(f"generated module {name!r} lacks {const}; regenerate it")
        _MODULES[key] = module
    return _MODULES[key]


@dataclass(frozen=True, eq=False)
class Value:
    """A named tensor in a graph: a graph input, a parameter, or one output of a node."""

    graph: "Graph"
    name: str
    kind: str  # "input" | "param" | "output"
    node: "Node | None" = None

    def __repr__(self) -> str:
        origin = f" of {self.node.op}" if self.node is not None else ""
        return f"<{self.kind} {self.name}{origin}>"


@dataclass(eq=False)
class Node:
    """One call of a registered op: inputs in declaration order, params, and its output values."""

    op: str
    inputs: tuple[Value, ...]
    params: dict[str, Any]
    outputs: tuple[Value, ...] = ()
    input_names: tuple[str, ...] = ()  # the op's own names for its inputs
    differentiable: frozenset[int] = frozenset()  # positions of inputs that can get a gradient

    def __repr__(self) -> str:
        args = ", ".join(v.name for v in self.inputs)
        kw = "".join(f", {k}={v!r}" for k, v in self.params.items())
        outs = ", ".join(v.name for v in self.outputs)
        return f"{outs} = {self.op}({args}{kw})"


@dataclass
class Tape:
    """What a forward pass keeps for backward: every value by name and each node's ``saved``."""

    target: str
    values: dict[str, Any]
    saved: dict[int, Any] = field(default_factory=dict)  # id(node) -> saved tuple


def _ones_like(x):
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return torch.ones_like(x)
    import numpy as np

    return np.ones_like(x)


def _zeros_like(x):
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return torch.zeros_like(x)
    import numpy as np

    return np.zeros_like(x)


class Graph:
    """A directed acyclic graph of registered ops, built in topological order."""

    def __init__(self) -> None:
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self._count: dict[str, int] = {}

    # ---------------------------------------------------------------- declaration
    def _new(self, name: str, kind: str, node: Node | None = None) -> Value:
        if not isinstance(name, str) or not name:
            raise GraphError(f"a value name must be a non-empty string, got {name!r}")
        if name in self.values:
            raise GraphError(f"value name {name!r} is used twice in this graph")
        v = Value(self, name, kind, node)
        self.values[name] = v
        return v

    def input(self, name: str) -> Value:
        """A data input (features, labels): given a value at each call, not differentiated by default."""
        return self._new(name, "input")

    def param(self, name: str) -> Value:
        """A trainable parameter: given a value at each call; ``value_and_grad`` differentiates these by default."""
        return self._new(name, "param")

    def op(self, op_name: str, *inputs: Value, name: str | Iterable[str] | None = None, **params):
        """Apply the registered op ``op_name`` to ``inputs`` (in the op's declaration order).

        ``params`` are the op's scalar params (unset ones take their declared defaults); ``name``
        names the output value(s) (default ``<op><n>``). Returns the output ``Value``, or a tuple
        of them for an op with several outputs.
        """
        registry = _registry()
        if op_name not in registry:
            import difflib

            close = difflib.get_close_matches(str(op_name), registry.names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise GraphError(
                f"unknown op {op_name!r}; {hint}registered ops: {', '.join(registry.names())} "
                f"(`symgrad list` shows them with their inputs and params)"
            )
        decl = registry.get(op_name)
        names = [t.name for t in decl.inputs]
        if len(inputs) != len(names):
            raise GraphError(
                f"op {op_name!r} takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}"
            )
        for pos, v in enumerate(inputs):
            if not isinstance(v, Value):
                raise GraphError(
                    f"input {names[pos]!r} of op {op_name!r} must be a graph Value "
                    f"(from g.input, g.param or g.op), got {type(v).__name__}"
                )
            if v.graph is not self:
                raise GraphError(f"input {names[pos]!r} of op {op_name!r} ({v.name}) belongs to another graph")
        known = {p.name for p in decl.params}
        unknown = sorted(set(params) - known)
        if unknown:
            accepted = ", ".join(sorted(known)) if known else "none"
            raise GraphError(f"op {op_name!r} has no param(s) {', '.join(unknown)}; it accepts: {accepted}")
        from .declare import Role

        node = Node(
            op_name,
            tuple(inputs),
            dict(params),
            input_names=tuple(names),
            differentiable=frozenset(p for p, t in enumerate(decl.inputs) if t.role is Role.DIFF),
        )
        out_decls = [o.name for o in decl.outputs]
        if name is None:
            n = self._count.get(op_name, 0) + 1
            self._count[op_name] = n
            stem = f"{op_name}{n}"
            out_names = [stem] if len(out_decls) == 1 else [f"{stem}.{o}" for o in out_decls]
        else:
            out_names = [name] if isinstance(name, str) else list(name)
            if len(out_names) != len(out_decls):
                raise GraphError(f"op {op_name!r} has {len(out_decls)} output(s) ({', '.join(out_decls)}), got {len(out_names)} name(s)")
        node.outputs = tuple(self._new(n_, "output", node) for n_ in out_names)
        self.nodes.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def __repr__(self) -> str:
        lines = [f"input {v.name}" for v in self.values.values() if v.kind == "input"]
        lines += [f"param {v.name}" for v in self.values.values() if v.kind == "param"]
        lines += [repr(n) for n in self.nodes]
        return "Graph(\n  " + "\n  ".join(lines) + "\n)"

    @property
    def inputs(self) -> list[str]:
        return [n for n, v in self.values.items() if v.kind == "input"]

    @property
    def params(self) -> list[str]:
        return [n for n, v in self.values.items() if v.kind == "param"]

    # ---------------------------------------------------------------- evaluation
    def _name(self, v: Value | str) -> str:
        name = v.name if isinstance(v, Value) else v
        if name not in self.values:
            raise GraphError(f"no value named {name!r} in this graph; values: {', '.join(self.values)}")
        return name

    def _check_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(values, Mapping):
            raise GraphError(f"values must be a mapping name -> array, got {type(values).__name__}")
        leaves = [n for n, v in self.values.items() if v.kind != "output"]
        missing = [n for n in leaves if n not in values]
        if missing:
            raise GraphError(f"missing value(s) for {', '.join(missing)}; the graph needs {', '.join(leaves)}")
        extra = [n for n in values if n not in self.values]
        if extra:
            raise GraphError(f"unknown value name(s) {', '.join(map(repr, extra))}; the graph's inputs and params: {', '.join(leaves)}")
        computed = [n for n in values if self.values[n].kind == "output"]
        if computed:
            raise GraphError(f"{', '.join(computed)} are computed by the graph and cannot be given")
        return dict(values)

    def _module(self, node: Node, target: str) -> ModuleType:
        module = load_module(node.op, target)
        if len(module.INPUTS) != len(node.inputs):
            raise GraphError(
                f"generated module {module.__name__} takes inputs {tuple(module.INPUTS)} but node {node!r} "
                f"passes {len(node.inputs)}; the generated code is stale, regenerate it"
            )
        unknown = set(node.params) - set(module.PARAMS)
        if unknown:
            raise GraphError(f"generated module {module.__name__} has no param(s) {sorted(unknown)}; regenerate it")
        return module

    @staticmethod
    def _as_tuple(outputs, count: int) -> tuple:
        if count == 1 and not isinstance(outputs, tuple):
            return (outputs,)
        outputs = tuple(outputs)
        if len(outputs) != count:
            raise GraphError(f"a generated forward returned {len(outputs)} outputs, expected {count}")
        return outputs

    def _run(self, values: Mapping[str, Any], target: str, keep: bool) -> Tape:
        tape = Tape(target, self._check_values(values))
        env = tape.values
        for node in self.nodes:
            module = self._module(node, target)
            args = [env[v.name] for v in node.inputs]
            try:
                if keep:
                    outs, saved = module.forward_with_saved(*args, **node.params)
                    tape.saved[id(node)] = saved
                else:
                    outs = module.forward(*args, **node.params)
            except Exception as e:
                e.add_note(f"in graph node {node!r} (target {target})")
                raise
            for v, out in zip(node.outputs, self._as_tuple(outs, len(node.outputs))):
                env[v.name] = out
        return tape

    def forward(self, values: Mapping[str, Any], target: str = "numpy") -> dict[str, Any]:
        """Evaluate every node; returns all values (given and computed) by name."""
        return self._run(values, target, keep=False).values

    def forward_with_saved(self, values: Mapping[str, Any], target: str = "numpy") -> Tape:
        """Evaluate every node and keep what each one's backward needs."""
        return self._run(values, target, keep=True)

    def _default_output(self) -> str:
        if not self.nodes:
            raise GraphError("the graph has no ops")
        last = self.nodes[-1]
        if len(last.outputs) != 1:
            raise GraphError(f"the last node {last!r} has several outputs; name the one to differentiate (output=...)")
        return last.outputs[0].name

    def backward(
        self,
        tape: Tape,
        cotangents: Mapping[str, Any] | None = None,
        wrt: Iterable[Value | str] | None = None,
    ) -> dict[str, Any]:
        """Gradients of ``sum(cotangent * value)`` over the given outputs, with respect to ``wrt``.

        ``cotangents`` maps output names to their cotangents (default: 1 for the last node's
        output, e.g. a scalar loss). ``wrt`` defaults to every param. Returns name -> gradient
        for each name in ``wrt`` (a name no gradient reaches maps to ``None``).
        """
        wrt_names = self.params if wrt is None else [self._name(v) for v in wrt]
        if cotangents is None:
            out = self._default_output()
            cotangents = {out: _ones_like(tape.values[out])}
        cot: dict[str, Any] = {}
        for k, c in cotangents.items():
            cot[self._name(k)] = c
        # Only nodes downstream of a wrt value need to run backward.
        needs = set(wrt_names)
        for node in self.nodes:
            if any(v.name in needs for v in node.inputs):
                needs.update(v.name for v in node.outputs)
        grads: dict[str, Any] = dict(cot)  # a value's accumulated gradient (cotangent)
        for node in reversed(self.nodes):
            if not any(v.name in grads for v in node.outputs):
                continue  # nothing flows back through this node
            if not any(v.name in needs for v in node.inputs):
                continue  # nothing we differentiate lies upstream
            if id(node) not in tape.saved:
                raise GraphError(f"the tape has nothing saved for node {node!r}; run forward_with_saved first")
            module = self._module(node, tape.target)
            outs_cot = [grads[v.name] if v.name in grads else _zeros_like(tape.values[v.name]) for v in node.outputs]
            try:
                in_grads = module.backward(tape.saved[id(node)], *outs_cot)
            except Exception as e:
                e.add_note(f"in the backward of graph node {node!r} (target {tape.target})")
                raise
            in_grads = tuple(in_grads)
            if len(in_grads) != len(node.inputs):
                raise GraphError(f"backward of {node.op} returned {len(in_grads)} gradients for {len(node.inputs)} inputs")
            for v, g_ in zip(node.inputs, in_grads):
                if g_ is None or v.name not in needs:
                    continue
                # Accumulate with `+` (a new array): a tensor read twice gets both contributions,
                # and no gradient a backward returned is modified in place.
                grads[v.name] = grads[v.name] + g_ if v.name in grads else g_
        return {n: grads.get(n) for n in wrt_names}

    def value_and_grad(
        self,
        values: Mapping[str, Any],
        wrt: Iterable[Value | str] | None = None,
        output: Value | str | None = None,
        target: str = "numpy",
    ) -> tuple[Any, dict[str, Any]]:
        """``(value of output, {name: gradient})``; ``output`` defaults to the last node's (scalar loss)."""
        tape = self.forward_with_saved(values, target)
        out = self._default_output() if output is None else self._name(output)
        loss = tape.values[out]
        return loss, self.backward(tape, {out: _ones_like(loss)}, wrt)
