"""An op rendered into a file and imported, as ``symgrad generate`` would write it, for tests that
declare their own ops (a user's op is never in the library's generated/)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from symgrad.declare import Op
from symgrad.derive import derive
from symgrad.plan import lower
from symgrad.targets import numpy as numpy_target
from symgrad.targets import triton as triton_target


def render_module(op: Op, target: str, folder: Path, stem: str) -> ModuleType:
    """Derive, lower and render ``op`` for ``target`` into ``folder/stem.py`` and import it (registered
    in ``sys.modules`` under ``stem``: Triton modules register torch custom ops by name)."""
    renderer = numpy_target if target == "numpy" else triton_target
    path = Path(folder) / f"{stem}.py"
    path.write_text(renderer.render(lower(derive(op, trace=False)), f"symgrad generate {op.name} --target {target}"))
    spec = importlib.util.spec_from_file_location(stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[stem] = mod
    spec.loader.exec_module(mod)
    return mod
