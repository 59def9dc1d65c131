"""The README's Python snippets run as pasted, in order, in one fresh interpreter (the second one
continues the first, as the README says), and every `print(...)  # value` prints that value."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_snippets_run_as_pasted(tmp_path):
    blocks = snippets()
    assert len(blocks) >= 2
    code = "\n".join(blocks)
    expected = [line.split("#", 1)[1].strip() for line in code.splitlines() if line.startswith("print(") and "#" in line]
    assert expected, "the snippets show no printed values"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == expected
