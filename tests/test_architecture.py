"""The layering of docs/architecture.md, checked on the source: each package imports only those below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lily_lab

ROOT = Path(lily_lab.__file__).parent
# The library packages, lowest first, then the application layer (lily_lab/app: the `lily-lab`
# command, the demo, the tweets and chat data, the HTML report), which may use every package and
# which no package may import (a library function must not reach up into the command line or the demo).
# monitor (training-time metrics and warnings) composes observe and analysis, below the views.
ORDER = ["core", "observe", "analysis", "monitor", "plots", "widgets", "app"]
# What each layer may import from lily_lab (plots sits beside core: it knows only DataFrames).
ALLOWED = {
    "core": set(),
    "observe": {"core"},
    "analysis": {"core", "observe"},
    "monitor": {"core", "observe", "analysis"},
    "plots": set(),
    "widgets": {"core", "observe", "analysis", "plots"},
    "app": {"core", "observe", "analysis", "monitor", "plots", "widgets"},
}
FORBIDDEN_THIRD_PARTY = {
    "core": {"plotly", "ipywidgets", "pandas", "anywidget", "peft"},
    "observe": {"plotly", "ipywidgets", "anywidget", "peft"},
    "analysis": {"plotly", "ipywidgets", "anywidget", "peft"},
    "monitor": {"plotly", "ipywidgets", "anywidget", "peft"},
    "plots": {"ipywidgets", "anywidget", "torch", "peft"},
}
# Every module of the application layer, so that a new one is placed on purpose.
APP = {"cli", "commands", "demo", "llm", "report", "runtime"}
# lily_lab.<name> for these is the module lily_lab.app.<name> (their names before lily_lab/app;
# lily_lab/__init__.py): an import by the old name is an import of the application layer.
MOVED = {"cli", "commands", "demo", "llm", "report"}


# lily_lab's exceptions: a module that imports nothing, which every layer may raise (plots too, so
# that a bad frame is a LilyLabError like every other bad input).
SHARED = {"lily_lab.core.errors", "lily_lab.core.names", "lily_lab.core.palette"}


def _is_module(name: str) -> bool:
    """Whether ``name`` (``lily_lab.plots``, ``lily_lab.app.demo``, an old name ``lily_lab.demo``) is
    a package or module of lily_lab, not a function or class."""
    parts = canonical(name).split(".")
    if parts[0] != "lily_lab" or len(parts) < 2:
        return False
    where = ROOT.joinpath(*parts[1:])
    return (where / "__init__.py").exists() or where.with_suffix(".py").exists()


def canonical(name: str) -> str:
    """``lily_lab.demo…`` (an old name) as ``lily_lab.app.demo…``; any other name as it is."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "lily_lab" and parts[1] in MOVED:
        return ".".join(["lily_lab", "app", *parts[1:]])
    return name


def _relative_base(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from`` import names, absolute: relative ones resolved against
    ``lily_lab.<package>`` (``lily_lab`` for a top-level module, ``package=""``)."""
    if not node.level:
        return node.module or ""
    parts = ["lily_lab", package] if package else ["lily_lab"]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, package: str) -> set[str]:
    """Top-level names imported by a module: lily_lab subpackages as 'lily_lab.<sub>' (an old name
    of an application module as 'lily_lab.app.<name>')."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = _relative_base(node, package)
            if not mod:
                continue
            found.add(mod)  # `from .. import plots`, `from ..app import demo`: the modules imported too
            found |= {f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")}
    return {canonical(n) for n in found}


def _layer_files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).glob("*.py"))


@pytest.mark.parametrize("layer", ORDER)
def test_layers_import_one_way(layer):
    assert _layer_files(layer), f"lily_lab/{layer}/ has no modules"
    for path in _layer_files(layer):
        for name in imports_of(path, layer):
            parts = name.split(".")
            if name in SHARED:
                continue
            if parts[0] == "lily_lab" and len(parts) > 1 and parts[1] != layer:
                assert parts[1] in ALLOWED[layer], f"{layer}/{path.name} imports {name}"
            assert parts[0] not in FORBIDDEN_THIRD_PARTY.get(layer, set()), f"{layer}/{path.name} imports {name}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..analysis import router_metrics\nimport plotly\nfrom .. import demo\n"
                   "from lily_lab import llm\nimport lily_lab.cli\nfrom ..app.report import report\n"
                   "from ..app import commands\nfrom lily_lab.app.runtime import threads_for_the_run\n")
    names = imports_of(bad, "core")
    assert "lily_lab.analysis" in names and "plotly" in names
    assert {"lily_lab.app.demo", "lily_lab.app.llm", "lily_lab.app.cli", "lily_lab.app.report",
            "lily_lab.app.commands", "lily_lab.app.runtime"} <= names
    assert application_imports(bad, "widgets") == {"lily_lab.app", "lily_lab.app.demo", "lily_lab.app.llm",
                                                    "lily_lab.app.cli", "lily_lab.app.report",
                                                    "lily_lab.app.commands", "lily_lab.app.runtime"}
    ok = tmp_path / "ok.py"
    ok.write_text("from .. import plots, LilyConfig, __version__\nfrom . import demo\nfrom ..core.errors import InputError\n")
    assert imports_of(ok, "app") == {"lily_lab", "lily_lab.plots", "lily_lab.app", "lily_lab.app.demo",
                                     "lily_lab.core.errors"}


def test_every_top_level_module_is_classified():
    """The top of lily_lab holds ``__init__.py`` and the packages, nothing else; the application
    layer's modules are the ones this test knows."""
    assert {p.name for p in ROOT.glob("*.py")} == {"__init__.py"}, "a module at the top of lily_lab: put it in a package"
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert packages == set(ORDER), f"folders of lily_lab not in ORDER (or gone): {sorted(packages ^ set(ORDER))}"
    assert all((ROOT / p / "__init__.py").is_file() for p in ORDER)
    app = {p.stem for p in _layer_files("app")} - {"__init__"}
    assert app == APP, f"modules of lily_lab/app not in APP (or gone): {sorted(app ^ APP)}"
    assert MOVED <= APP


def application_imports(path: Path, package: str) -> set[str]:
    """What ``path`` imports of the application layer (by its new or its old names)."""
    return {n for n in imports_of(path, package) if n == "lily_lab.app" or n.startswith("lily_lab.app.")}


@pytest.mark.parametrize("layer", [p for p in ORDER if p != "app"])
def test_no_package_imports_the_application_layer(layer):
    for path in _layer_files(layer):
        app = application_imports(path, layer)
        assert not app, f"{layer}/{path.name} imports the application layer: {sorted(app)}"


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def private_imports(path: Path, package: str) -> set[str]:
    """Each underscore name ``path`` takes from *another* lily_lab package (or, for a top-level
    module, ``package=""``, from any package), as ``module.name``: an underscore name imported
    (``from ..core.inject import _x``), a private module imported from or named
    (``from ..plots._common import x``, ``import lily_lab.plots._common``), and an underscore
    attribute of such a module (``from .. import plots`` … ``plots._common``, ``demo._quiet()``)."""
    tree = ast.parse(path.read_text())
    found = set()
    bound = {}  # local name → the lily_lab module of another package it is bound to

    def crossing(name: str) -> bool:
        parts = canonical(name).split(".")
        return len(parts) > 1 and parts[0] == "lily_lab" and (not package or parts[1] != package)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _relative_base(node, package)
            if not mod.startswith("lily_lab"):
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                if crossing(full) and any(_private(p) for p in canonical(full).split(".")[1:]):
                    found.add(full)
                if crossing(full) and _is_module(full):
                    bound[a.asname or a.name] = full
        elif isinstance(node, ast.Import):
            for a in node.names:
                if crossing(a.name) and any(_private(p) for p in canonical(a.name).split(".")[1:]):
                    found.add(a.name)
                if a.asname and crossing(a.name):
                    bound[a.asname] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in bound:
            found.add(f"{bound[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_crosses_a_package():
    """What one package uses of another is public there (no underscore): a newcomer can rename a
    private helper without reading the whole project. The application layer counts as a package:
    nothing private crosses into it or out of it."""
    crossing = {}
    for layer in ORDER:
        for path in _layer_files(layer):
            if found := private_imports(path, layer):
                crossing[f"{layer}/{path.name}"] = sorted(found)
    if found := private_imports(ROOT / "__init__.py", ""):
        crossing["__init__.py"] = sorted(found)
    assert not crossing, crossing


def test_the_private_checker_sees_a_crossing():
    def check(text, package):
        return private_imports_of_text(text, package)

    assert check("from ..core.inject import _x, y", "observe") == {"lily_lab.core.inject._x"}
    assert check("from ..plots._common import message_figure", "app") == {"lily_lab.plots._common.message_figure"}
    assert check("import lily_lab.plots._common", "app") == {"lily_lab.plots._common"}
    assert check("from .. import plots\nplots._common.figure()", "app") == {"lily_lab.plots._common"}
    assert check("from lily_lab import demo as D\nD._quiet_transformers()", "widgets") == \
        {"lily_lab.demo._quiet_transformers"}
    assert check("from ..app.demo import _model_path", "analysis") == {"lily_lab.app.demo._model_path"}
    assert check("from .. import _MOVED", "app") == {"lily_lab._MOVED"}
    # inside one package, private names are that package's own business
    assert check("from . import demo as D\nD._quiet_transformers()\nfrom .llm import _render", "app") == set()
    assert check("from ._common import _GROUP", "plots") == set()


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
