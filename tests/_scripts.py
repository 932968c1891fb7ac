"""The helper scripts of tests/dist_scripts/ (launched in other processes), imported by the tests
that launch them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"


def load_script(name: str):
    """dist_scripts/<name>.py as a module, under a name no other test module can shadow."""
    spec = importlib.util.spec_from_file_location(f"lily_dist_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
