"""A user's own ops for symgrad. Importing this package registers them (``[tool.symgrad] ops``
in ../pyproject.toml names it); each module is one declaration block."""
from . import attention, geglu, hardswish, huber  # noqa: F401
