"""The build's package layout; everything else is declared in pyproject.toml.

A checkout keeps two folders at its top level (the design card's layout): ``templates/`` (the Jinja
skeletons) and ``generated/`` (the library's generated modules). A wheel maps both into the package
at build time, as ``symgrad/templates/`` and ``symgrad/generated/``: the installed library's
generated modules import as ``symgrad.generated.<target>.<op>``, a name that a user's own
``./generated`` folder cannot shadow, and no top-level ``generated`` package is installed.
"""
from setuptools import find_namespace_packages, setup

SKIP = ["*.__pycache__", "*.__pycache__.*"]

setup(
    packages=(
        find_namespace_packages(include=["symgrad", "symgrad.*"], exclude=SKIP)
        + ["symgrad.templates." + p for p in find_namespace_packages(where="templates", exclude=SKIP)]
        + ["symgrad.templates"]
        + ["symgrad." + p for p in find_namespace_packages(include=["generated", "generated.*"], exclude=SKIP)]
    ),
    package_dir={"symgrad.templates": "templates", "symgrad.generated": "generated"},
    package_data={"symgrad.templates": ["*/*.j2"]},
    exclude_package_data={"symgrad.generated": [".manifest.json"]},
)
