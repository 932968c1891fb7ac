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
SHARED = {"lily_lab.core.errors", "lily_lab.core.names", "lily_lab.core.palette"}


def _is_module(name: str) -> bool:
    """Whether ``lily_lab.<name>`` is a package or module (not a function or class of lily_lab)."""
    return (ROOT / name / "__init__.py").exists() or (ROOT / f"{name}.py").exists()


def imports_of(path: Path, package: str) -> set[str]:
    """Top-level names imported by a module: lily_lab subpackages as 'lily_lab.<sub>'."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against lily_lab.<package> (lily_lab for a top-level module)
                parts = ["lily_lab", package] if package else ["lily_lab"]
                base = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # `from .. import plots`: the names that are modules of lily_lab
                    found |= {f"{mod}.{a.name}" for a in node.names if mod != "lily_lab" or _is_module(a.name)}
                else:
                    found.add(mod)
            elif node.module:
                found.add(node.module)
                if node.module == "lily_lab":  # `from lily_lab import demo`
                    found |= {f"lily_lab.{a.name}" for a in node.names if _is_module(a.name)}
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
    bad.write_text("from ..analysis import router_metrics\nimport plotly\nfrom .. import demo\n")
    names = imports_of(bad, "core")
    assert "lily_lab.analysis" in names and "plotly" in names and "lily_lab.demo" in names


# The application layer: the modules at the top of the package. They may use every package; no
# package may import them (a library function must not reach up into the command line or the demo).
APP = {"cli", "commands", "demo", "llm", "report"}


def test_every_top_level_module_is_classified():
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "__main__"}
    assert top == APP, f"top-level modules not in APP (or gone): {sorted(top ^ APP)}"
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ORDER)


@pytest.mark.parametrize("layer", ORDER)
def test_no_package_imports_the_application_layer(layer):
    for path in sorted((ROOT / layer).glob("*.py")):
        app = {n for n in imports_of(path, layer) if n.split(".")[:2] in [["lily_lab", a] for a in APP]}
        assert not app, f"{layer}/{path.name} imports the application layer: {sorted(app)}"


def private_imports(path: Path, package: str) -> set[str]:
    """``module._name`` for each underscore name ``path`` imports from *another* lily_lab package
    (or, for a top-level module, from any package)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ["lily_lab", package] if package else ["lily_lab"]
            mod = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            parts = mod.split(".")
            other = len(parts) > 1 and (not package or parts[1] != package)
            if other:
                found |= {f"{mod}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")}
    return found


def test_no_private_name_crosses_a_package():
    """What one package uses of another is public there (no underscore): a newcomer can rename a
    private helper without reading the whole project."""
    crossing = {}
    for layer in ORDER:
        for path in sorted((ROOT / layer).glob("*.py")):
            if found := private_imports(path, layer):
                crossing[f"{layer}/{path.name}"] = sorted(found)
    for name in sorted(APP):
        if found := private_imports(ROOT / f"{name}.py", ""):
            crossing[f"{name}.py"] = sorted(found)
    assert not crossing, crossing
    # the checker itself sees one:
    assert private_imports_of_text("from ..core.inject import _x, y", "observe") == {"lily_lab.core.inject._x"}


def private_imports_of_text(text: str, package: str) -> set[str]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    try:
        return private_imports(Path(f.name), package)
    finally:
        Path(f.name).unlink()


def test_public_api_is_explicit():
    for name in lily_lab.__all__:
        assert getattr(lily_lab, name) is not None, name
    contract = ["LilyConfig", "add_lily", "remove_lily", "adapter_sites", "count_parameters", "save_adapter",
                "load_adapter", "record_routing", "router_metrics", "specialization", "expert_similarity"]
    assert set(contract) <= set(lily_lab.__all__)
