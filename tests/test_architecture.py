"""The layering of docs/architecture.md, checked on the source: each package imports only those below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lily_lab

ROOT = Path(lily_lab.__file__).parent
ORDER = ["core", "observe", "analysis", "plots", "widgets"]
# What each layer may import from lily_lab (plots sits beside core: it knows only DataFrames).
ALLOWED = {
    "core": set(),
    "observe": {"core"},
    "analysis": {"core", "observe"},
    "plots": set(),
    "widgets": {"core", "observe", "analysis", "plots"},
}
FORBIDDEN_THIRD_PARTY = {
    "core": {"plotly", "ipywidgets", "pandas", "anywidget", "peft"},
    "observe": {"plotly", "ipywidgets", "anywidget", "peft"},
    "analysis": {"plotly", "ipywidgets", "anywidget", "peft"},
    "plots": {"ipywidgets", "anywidget", "torch", "peft"},
}


# lily_lab's exceptions: a module that imports nothing, which every layer may raise (plots too, so
# that a bad frame is a LilyLabError like every other bad input).
SHARED = {"lily_lab.core.errors"}


def imports_of(path: Path, package: str) -> set[str]:
    """Top-level names imported by a module: lily_lab subpackages as 'lily_lab.<sub>'."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against lily_lab.<package>
                parts = ["lily_lab", package]
                base = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                found.add(mod)
            elif node.module:
                found.add(node.module)
    return found


@pytest.mark.parametrize("layer", [p for p in ORDER if (ROOT / p).is_dir()])
def test_layers_import_one_way(layer):
    for path in sorted((ROOT / layer).glob("*.py")):
        for name in imports_of(path, layer):
            parts = name.split(".")
            if name in SHARED:
                continue
            if parts[0] == "lily_lab" and len(parts) > 1 and parts[1] != layer:
                assert parts[1] in ALLOWED[layer], f"{path.name} ({layer}) imports {name}"
            assert parts[0] not in FORBIDDEN_THIRD_PARTY.get(layer, set()), f"{path.name} ({layer}) imports {name}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..analysis import router_metrics\nimport plotly\n")
    names = imports_of(bad, "core")
    assert "lily_lab.analysis" in names and "plotly" in names


def test_public_api_is_explicit():
    for name in lily_lab.__all__:
        assert getattr(lily_lab, name) is not None, name
    contract = ["LilyConfig", "add_lily", "remove_lily", "adapter_sites", "count_parameters", "save_adapter",
                "load_adapter", "record_routing", "router_metrics", "specialization", "expert_similarity"]
    assert set(contract) <= set(lily_lab.__all__)
