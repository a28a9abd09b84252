"""Where a run's ops come from: symgrad's op library, the user's project, and ``--ops``.

Every command (``list``, ``derive``, ``generate``, ``check``) first calls :func:`load`, which

1. imports the op library (``symgrad.ops``: always registered, so a user op may reuse its dims and
   a user op named like a library op is a clash);
2. reads the ``[tool.symgrad]`` table of the ``pyproject.toml`` in the current directory, if it has
   one, and imports the modules it names (importing a module registers its ops)::

       [tool.symgrad]
       ops = ["userops"]        # importable module names, from the project folder (required, unless --ops)
       out = "generated"        # where `symgrad generate` writes, relative to pyproject.toml (default "generated")
       package = "generated"    # the import name of that folder (default: `out` with "/" read as ".")

3. imports each ``--ops MODULE`` given on the command line (repeatable), also from the current
   directory.

A run with user modules (2 or 3) is a *user project*: ``list``, ``generate`` and ``check`` without op
names act on the user's ops only (``symgrad list --all`` also lists the library); any registered op,
library ones included, may still be named explicitly. ``generate`` writes into the project's ``out``
(``./generated`` for ``--ops`` alone). A user op's regenerate banner adds ``--ops <its module>`` when
the op came from ``--ops`` rather than from the table, so the command it quotes works as written.
Without user modules nothing changes: the library's 29 ops, into the checkout's ``generated/``.

Bad input is a :class:`ProjectError` with a one-line message naming the file (``pyproject.toml``, or
the module file that failed to import); the CLI prints it without a traceback.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Project", "ProjectError", "KEYS", "read", "load", "current", "regenerate_flags", "relative"]

#: The keys ``[tool.symgrad]`` may have.
KEYS = ("ops", "out", "package")
_PACKAGE_DIR = Path(__file__).resolve().parent


class ProjectError(Exception):
    """A user project (its ``[tool.symgrad]`` table or an ``--ops`` module) cannot be loaded; the
    message is one line and names the file."""


@dataclass(frozen=True)
class Project:
    """What one run works on. ``root`` is the folder user modules import from and paths are
    shown relative to (the current directory); ``pyproject`` the file whose ``[tool.symgrad]`` was
    read (None if none); ``modules`` and ``cli_modules`` the modules from the table and from
    ``--ops``; ``out``/``package`` where generated modules go and their import name (None when the
    run keeps symgrad's defaults); ``ops`` the op names the user modules registered, in
    registration order, and ``cli_ops`` those registered only by ``--ops`` modules."""

    root: Path
    pyproject: Path | None = None
    modules: tuple[str, ...] = ()
    cli_modules: tuple[str, ...] = ()
    out: Path | None = None
    package: str | None = None
    ops: tuple[str, ...] = ()
    cli_ops: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_user(self) -> bool:
        """True when user modules are in play (a ``[tool.symgrad]`` table or ``--ops``)."""
        return self.pyproject is not None or bool(self.cli_modules)

    def default_ops(self) -> list[str]:
        """The ops a command without op names acts on: the user's in a user project, else every
        registered op."""
        from .declare import REGISTRY

        return list(self.ops) if self.is_user else REGISTRY.names()


_CURRENT: Project | None = None


def current() -> Project:
    """The project the last :func:`load` found (before any load: the library alone, no user modules)."""
    return _CURRENT if _CURRENT is not None else Project(root=Path.cwd())


def relative(path: Path | str, root: Path | None = None) -> str:
    """``path`` relative to ``root`` (default: the current directory) when under it, else as given."""
    path = Path(path)
    try:
        return path.resolve().relative_to((root or Path.cwd()).resolve()).as_posix()
    except (ValueError, OSError):
        return str(path)


# ------------------------------------------------------------------------------------------------
# the [tool.symgrad] table


def read(cwd: Path | None = None, cli_modules=()) -> Project:
    """The project of folder ``cwd`` (default: the current directory), without importing anything."""
    root = Path(cwd or Path.cwd()).resolve()
    cli_modules = tuple(dict.fromkeys(_module_name(m, "--ops") for m in cli_modules))
    path = root / "pyproject.toml"
    if not path.is_file():
        return Project(root=root, cli_modules=cli_modules, out=root / "generated" if cli_modules else None,
                       package="generated" if cli_modules else None)
    where = relative(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProjectError(f"{where}: cannot be read: {_line(e)}") from None
    table = data.get("tool", {}).get("symgrad") if isinstance(data.get("tool"), dict) else None
    if table is None:  # not a symgrad project (symgrad's own checkout, for one)
        return Project(root=root, cli_modules=cli_modules, out=root / "generated" if cli_modules else None,
                       package="generated" if cli_modules else None)
    if not isinstance(table, dict):
        raise ProjectError(f"{where}: [tool.symgrad] must be a table")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ProjectError(f"{where}: [tool.symgrad] has unknown key {unknown[0]!r} (its keys are: {', '.join(KEYS)})")
    ops = table.get("ops", [])
    if isinstance(ops, str) or not isinstance(ops, list) or not all(isinstance(m, str) for m in ops):
        raise ProjectError(f'{where}: [tool.symgrad] ops must be a list of module names (ops = ["mypackage.ops"])')
    modules = tuple(dict.fromkeys(_module_name(m, f"{where}: [tool.symgrad] ops") for m in ops))
    if not modules and not cli_modules:
        raise ProjectError(f'{where}: [tool.symgrad] names no ops modules; add ops = ["your_module"] (or pass --ops MODULE)')
    out_text = table.get("out", "generated")
    if not isinstance(out_text, str) or not out_text.strip():
        raise ProjectError(f'{where}: [tool.symgrad] out must be a folder name (out = "generated")')
    out = (root / out_text).resolve()
    package = table.get("package")
    if package is None:
        package = ".".join(Path(relative(out, root)).parts) if out.is_relative_to(root) and out != root else "generated"
    if not isinstance(package, str) or not all(p.isidentifier() for p in package.split(".")):
        raise ProjectError(f"{where}: [tool.symgrad] package must be a dotted module name, not {package!r}")
    return Project(root=root, pyproject=path, modules=modules, cli_modules=cli_modules, out=out, package=package)


def _module_name(name, source: str) -> str:
    if not isinstance(name, str) or not all(part.isidentifier() for part in name.strip().split(".")):
        raise ProjectError(f"{source}: {name!r} is not a module name (a dotted Python name such as mypackage.ops)")
    return name.strip()


# ------------------------------------------------------------------------------------------------
# importing the user's modules


def load(cli_modules=(), cwd: Path | None = None) -> Project:
    """Register the library and the project's ops (see the module doc); returns the project and
    makes it :func:`current`. Importing is idempotent: a module imported before is not imported again."""
    global _CURRENT
    project = read(cwd, cli_modules)
    import symgrad.ops  # noqa: F401  (the op library registers first)
    from .declare import REGISTRY

    if project.is_user and str(project.root) not in sys.path:
        sys.path.insert(0, str(project.root))  # as `python -m` would: the project's modules import from it
        importlib.invalidate_caches()
    from_table: list[str] = []
    from_cli: list[str] = []
    sources = [(m, f"{relative(project.pyproject)}: [tool.symgrad] ops", from_table) for m in project.modules]
    sources += [(m, "--ops", from_cli) for m in project.cli_modules]
    for module, source, names in sources:
        names += _import(module, source, project.root)
    mine = set(from_table) | set(from_cli)
    _CURRENT = project = Project(**{
        **project.__dict__,
        "ops": tuple(n for n in REGISTRY.names() if n in mine),
        "cli_ops": frozenset(set(from_cli) - set(from_table)),
    })
    return project


#: op name -> the user module whose import registered it (kept across loads, since a module is imported once).
_ORIGIN: dict[str, str] = {}


def _import(module: str, source: str, root: Path) -> list[str]:
    """Import ``module``; the names of the ops it registers (also when it was imported before)."""
    from .declare import REGISTRY, DuplicateOpError

    before = set(REGISTRY.names())
    try:
        importlib.import_module(module)
    except DuplicateOpError as e:
        raise ProjectError(
            f"{_where_raised(e, root) or source}: op {e.name!r} is declared twice: in {_module_file(e.first, root)} "
            f"and in {_module_file(e.second, root)}"
        ) from None
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ProjectError(f"{source}: no module named {module!r} (looked in {root} and on sys.path)") from None
        raise ProjectError(f"{source}: importing {module} failed: {_where_raised(e, root)}: {_line(e)}") from None
    except BaseException as e:  # noqa: BLE001 (a user module may raise anything, SystemExit included)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ProjectError(f"{source}: importing {module} failed: {_where_raised(e, root)}: {_line(e)}") from None
    for name in REGISTRY.names():
        if name not in before:
            _ORIGIN[name] = module
    return [
        op.name for op in REGISTRY
        if _ORIGIN.get(op.name) == module or op.module == module or op.module.startswith(module + ".")
    ]


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _module_file(module: str, root: Path) -> str:
    """``module (its/file.py)``; also for a module whose import just failed (no longer in sys.modules)."""
    path = getattr(sys.modules.get(module), "__file__", None)
    if path is None and module:
        try:
            spec = importlib.util.find_spec(module)
            path = spec.origin if spec and spec.has_location else None
        except (ImportError, ValueError):
            path = None
    return f"{module} ({relative(path, root)})" if path else module


def _where_raised(e: BaseException, root: Path) -> str | None:
    """``file:line`` of the innermost frame outside symgrad and the import machinery (the user's
    code that failed); for a SyntaxError, the file and line it names."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{relative(e.filename, root)}:{e.lineno}"
    found = None
    for frame in traceback.extract_tb(e.__traceback__):
        name = frame.filename
        if name.startswith("<frozen") or Path(name).resolve().is_relative_to(_PACKAGE_DIR):
            continue
        found = f"{relative(name, root)}:{frame.lineno}"
    return found


# ------------------------------------------------------------------------------------------------
# what other modules ask


def regenerate_flags(op_name: str) -> str:
    """What a regenerate command needs besides the op and target: ``" --ops <module>"`` for an op
    that only an ``--ops`` module registered (a table's modules are found again from pyproject.toml)."""
    project = current()
    if op_name not in project.cli_ops:
        return ""
    from .declare import REGISTRY

    module = REGISTRY.get(op_name).module if op_name in REGISTRY else ""
    return f" --ops {module or _ORIGIN.get(op_name, '')}"


def modules_for(op_name: str) -> dict[str, str]:
    """The importable module ``symgrad generate`` writes for the op, per target: the project's
    package for a user op, the library's generated package for a library op."""
    from .targets import TARGETS, library_package

    project = current()
    package = project.package if (project.is_user and op_name in project.ops) else library_package()
    return {name: f"{package}.{t.subpackage}.{op_name}" for name, t in TARGETS.items()}


def default_out() -> Path | None:
    """Where ``symgrad generate`` writes when ``--out`` is not given (None: symgrad's default)."""
    return current().out

