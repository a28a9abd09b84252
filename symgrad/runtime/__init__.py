"""Small runtime helpers that generated modules import (``generated/<target>/*.py``).

Only what cannot be spelled inline in a generated file lives here: numerically careful special
functions and the argument checks every generated module shares.
"""
