"""The design notes in docs/ are the ones the code cites, and they cannot silently drop a metric or a
finding: every citation resolves to a file in this repository, and the names the code produces
(router_metrics columns, the other analyses' measures, diagnose's finding kinds and thresholds)
all appear in docs/metrics.md and docs/diagnosis.md."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lily_lab as ll

# By module path: ``lily_lab.analysis.diagnose`` is also the name of the function the package exports.
causal = importlib.import_module("lily_lab.analysis.causal")
diagnose = importlib.import_module("lily_lab.analysis.diagnose")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["README.md", "lily.md", "metrics.md", "diagnosis.md", "architecture.md"]
THIS = Path(__file__).resolve()

# Citations of notes outside this repository, which a reader cannot open.
FORBIDDEN = ("DESIGN §", "../shared")
SECTION = re.compile(r"§\s*\d")  # a bare "§5" names a section of no document
CITED = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.(?:md|png))")


def text_files(*places: str) -> list[Path]:
    """Every readable text file under ``places`` (folders or files of the repository root),
    caches left out."""
    out = []
    for place in places:
        path = ROOT / place
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in paths:
            if "__pycache__" in p.parts or ".ipynb_checkpoints" in p.parts or p.suffix in (".pyc", ".png"):
                continue
            try:
                p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.append(p)
    return out


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_the_notes_exist_and_the_index_links_each():
    for name in PAGES:
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
    index = doc("README.md")
    for name in PAGES[1:]:
        assert f"]({name})" in index, f"docs/README.md does not link {name}"
    assert "docs/README.md" in (ROOT / "README.md").read_text(encoding="utf-8"), "README.md does not point at docs/"


def test_no_citation_of_notes_outside_the_repository():
    bad = []
    for path in text_files("lily_lab", "benchmarks", "tests", "notebooks", "README.md"):
        if path.resolve() == THIS:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(s in line for s in FORBIDDEN) or SECTION.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "cite a file of docs/ instead:\n" + "\n".join(bad)


def test_every_cited_docs_file_exists():
    missing = []
    for path in text_files("lily_lab", "benchmarks", "tests", "notebooks", "README.md"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in CITED.findall(line):
                if not (DOCS / name).is_file():
                    missing.append(f"{path.relative_to(ROOT)}:{n} cites docs/{name}")
    assert not missing, "\n".join(missing)


def test_links_between_the_notes_resolve():
    missing = []
    for name in PAGES:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", doc(name)):
            if "://" not in target and not (DOCS / target).exists():
                missing.append(f"docs/{name} links {target}")
    assert not missing, "\n".join(missing)


# --------------------------------------------------------------------------- names from the code


class _Tiny(nn.Module):
    """Two 8 → 8 linear layers in a row: one group of two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture(scope="module")
def tiny():
    """A tiny routed adapter (random B, so every measure is defined) and a labelled recording."""
    torch.manual_seed(0)
    model = ll.add_lily(_Tiny(), ll.LilyConfig(r"layers\.\d", r=2, stride_A=2, num_B=3, init_weights=False))
    with ll.record_routing(model) as rec, torch.no_grad():
        model(torch.randn(2, 5, 8))
        rec.annotate(labels=["a", "b"])
    return model, rec.routing


# Columns that say *where* or *which*, not a measure.
PLACE = {"site", "module", "group", "index", "layer", "kind", "routing", "num_B", "value", "expert", "expert_i",
         "expert_j", "mixture", "r", "k", "epsilon", "rank", "token_id", "step", "metric"}


def _missing(names, page: str) -> list[str]:
    text = doc(page)
    return [n for n in dict.fromkeys(names) if f"`{n}`" not in text]


def test_every_router_metric_column_is_documented(tiny):
    _, routing = tiny
    columns = list(ll.router_metrics(routing).columns)
    assert "routing_mi" in columns and len(columns) > 10  # the frame the code really returns
    missing = _missing(columns, "metrics.md")
    assert not missing, f"router_metrics returns {missing}, which docs/metrics.md does not define"


def test_every_other_measure_is_documented(tiny):
    model, routing = tiny
    frames = {
        "rank_summary": ll.rank_summary(ll.delta_spectra(model)),
        "bank_summary": ll.bank_summary(model),
        "expert_similarity": ll.expert_similarity(model),
        "intruder_dimensions": ll.intruder_dimensions(model, k=2, progress=False),
        "specialization": ll.specialization(routing, by="label"),
        "expert_layer_profile": ll.expert_layer_profile(routing),
        "parameter_budget": ll.parameter_budget(8, 8, 2, [2]),
    }
    names = [c for frame in frames.values() for c in frame.columns if c not in PLACE]
    names += [c for c in causal.COLUMNS if c != "routing"]  # causal_consistency needs a causal LM to run
    missing = _missing(names, "metrics.md")
    assert not missing, f"these measures are not defined in docs/metrics.md: {missing}"


def _finding_kinds_in_source() -> set[str]:
    """The ``kind`` of every ``Finding(...)`` that diagnose.py builds (its first argument)."""
    tree = ast.parse(Path(diagnose.__file__).read_text(encoding="utf-8"))
    kinds = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Finding" and node.args:
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), ast.dump(first)
            kinds.add(first.value)
    return kinds


def test_every_finding_kind_and_threshold_is_documented():
    built = _finding_kinds_in_source()
    assert built == set(diagnose.KINDS), f"diagnose.KINDS {sorted(diagnose.KINDS)} ≠ the kinds built {sorted(built)}"
    missing = _missing(diagnose.KINDS, "diagnosis.md")
    missing += _missing([f.name for f in dataclasses.fields(diagnose.Thresholds)], "diagnosis.md")
    assert not missing, f"docs/diagnosis.md does not describe {missing}"
    text = doc("diagnosis.md")
    for kind in diagnose.KINDS:
        assert f"### `{kind}`" in text, f"docs/diagnosis.md has no section for {kind}"
