"""Every notebook in notebooks/ runs top to bottom (nbclient) with no error, and every lily_lab
name its code uses exists.

Notebooks are committed without outputs; ``test_notebook_runs`` executes them in a temporary copy,
and each one's last cells check the statements its text makes about the numbers. 01 and 06 run
in ``make test``; 02–05 train for minutes each (about 15 minutes together on 2 slow cores), so
they are marked ``full`` and run in ``make test-full``. ``make test`` still checks those four
without running them: their code compiles and every ``ll.x``, ``plots.x`` or ``from lily_lab…
import x`` they use is a real attribute (a renamed function shows there). How long each one takes
is in the list of the slowest tests, not asserted (a shared CPU's speed varies threefold between
runs); the per-cell timeout only stops a notebook that hangs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
IN_MAKE_TEST = {"01_quickstart", "06_beyond_lily"}  # the others run in `make test-full`
RUNS = [pytest.param(p, marks=() if p.stem in IN_MAKE_TEST else pytest.mark.full) for p in NOTEBOOKS]
CELL_TIMEOUT_S = 900  # a hang, not a slow machine


PLANNED = ["01_quickstart.ipynb", "02_teaching_peft.ipynb", "03_diagnosing_expert_collapse.ipynb",
           "04_delta_w_spectra.ipynb", "05_lily_on_a_small_llm.ipynb", "06_beyond_lily.ipynb"]


def test_the_notebooks_are_the_documented_ones():
    """The notebooks present are the README's, in order."""
    names = [p.name for p in NOTEBOOKS]
    assert names == PLANNED
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(f"`{n}`" in readme for n in names)


def _private_names(source: str) -> set[str]:
    """Underscore names a code cell takes from lily_lab: ``ll._x``, ``demo._x`` (any lily_lab module
    imported under a name) and ``from lily_lab… import _x``."""
    import ast

    tree = ast.parse(source)
    modules = {"ll", "lily_lab"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lily_lab"):
            modules |= {a.asname or a.name for a in node.names}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lily_lab"):
            found |= {a.name for a in node.names if a.name.startswith("_")}
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.add(f"{node.value.id}.{node.attr}")
    return found


def _code(path) -> list[str]:
    """A notebook's code cells, without IPython's ``%magic`` and ``!shell`` lines."""
    nbformat = pytest.importorskip("nbformat")
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    return ["\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))) for src in cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_use_public_names_only(path):
    """A notebook teaches the API a user has: no private lily_lab name (they may change unannounced)."""
    used = set().union(*(_private_names(src) for src in _code(path)))
    assert not used, f"{path.name} uses private lily_lab names: {sorted(used)}"
    assert _private_names("from lily_lab.app.demo import _rows\nfrom lily_lab.app import demo\ndemo._x(1)") == {"_rows", "demo._x"}


def _lily_lab_names(source: str) -> set[tuple[str, str]]:
    """(module, attribute) pairs a code cell takes from lily_lab: ``import lily_lab as ll`` then
    ``ll.x``; ``from lily_lab import plots`` then ``plots.x``; ``from lily_lab.app.demo import x``."""
    import ast

    tree = ast.parse(source)
    modules: dict[str, str] = {}
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name): a.name for a in node.names if a.name.startswith("lily_lab")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lily_lab"):
            for a in node.names:
                found.add((node.module, a.name))
                modules[a.asname or a.name] = f"{node.module}.{a.name}"  # a submodule, if it is one
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            found.add((modules[node.value.id], node.attr))
    return found


def _exists(module: str, attr: str) -> bool:
    """Whether ``module.attr`` is there: an attribute, or a submodule (``from lily_lab.app import demo``).
    ``module`` may itself be an attribute of its parent (``TimelinePlayer`` in ``lily_lab.widgets``)."""
    import importlib

    try:
        owner = importlib.import_module(module)
    except ImportError:
        parent, _, name = module.rpartition(".")
        owner = getattr(importlib.import_module(parent), name, None)
        return owner is not None and hasattr(owner, attr)
    if hasattr(owner, attr):
        return True
    try:
        importlib.import_module(f"{module}.{attr}")
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_code_compiles_and_its_lily_lab_names_exist(path):
    """What ``make test`` checks of the notebooks it does not run: a syntax error or a lily_lab
    name that was renamed or removed fails here, in seconds."""
    cells = _code(path)
    for i, src in enumerate(cells):
        compile(src, f"{path.name} code cell {i}", "exec")
    used = _lily_lab_names("\n".join(cells))  # one kernel: an import in one cell serves the later ones
    assert used, f"{path.name} uses nothing from lily_lab?"
    missing = sorted(f"{m}.{a}" for m, a in used if not _exists(m, a))
    assert not missing, f"{path.name} uses lily_lab names that do not exist: {missing}"
    # the check itself: a name that is not there is found
    assert not _exists("lily_lab", "no_such_function") and _exists("lily_lab.plots", "plot_spectra")
    assert _lily_lab_names("import lily_lab as ll\nfrom lily_lab import plots\nll.a; plots.b") == {
        ("lily_lab", "plots"), ("lily_lab", "a"), ("lily_lab.plots", "b")}


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
