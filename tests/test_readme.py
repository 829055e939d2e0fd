"""The README's Python examples run as written (on tiny random folders, fewer steps)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_quick_start_has_exactly_two_commands():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    assert "kosmos-g generate" in blocks[0] and "pytest" in blocks[1]
    assert all(len(b.strip().splitlines()) == 1 for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_example_runs(index, tmp_path, monkeypatch, tiny_kosmos_dir, tiny_sd_dir):
    shutil.copytree(tiny_kosmos_dir, tmp_path / "checkpoints/kosmos-g")
    shutil.copytree(tiny_sd_dir, tmp_path / "checkpoints/sd")
    shutil.copytree(ROOT / "src/kosmos_g/assets/examples", tmp_path / "src/kosmos_g/assets/examples")
    monkeypatch.chdir(tmp_path)
    # Shrink the work, not the code: same calls, 2 steps at 32 px.
    code = "\n".join(python_blocks()[: index + 1])
    code = code.replace("num_inference_steps=25", "num_inference_steps=2")
    code = code.replace("height=512, width=512", "height=32, width=32")
    exec(compile(code, f"README.md python block {index}", "exec"), {})
