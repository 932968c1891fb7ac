"""Every notebook in notebooks/ runs top to bottom (nbclient) with no error.

Notebooks are committed without outputs; this executes them in a temporary copy. How long each
one takes is in `make test`'s list of the slowest tests, not asserted here (a shared CPU's speed
varies threefold between runs); the per-cell timeout only stops a notebook that hangs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_use_public_names_only(path):
    """A notebook teaches the API a user has: no private lily_lab name (they may change unannounced)."""
    nbformat = pytest.importorskip("nbformat")
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    used = set().union(*(_private_names("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
                         for src in cells))
    assert not used, f"{path.name} uses private lily_lab names: {sorted(used)}"
    assert _private_names("from lily_lab.app.demo import _rows\nfrom lily_lab.app import demo\ndemo._x(1)") == {"_rows", "demo._x"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
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
