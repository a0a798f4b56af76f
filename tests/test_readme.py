"""Every ```python block of the README (and launch/README.md) runs as written, in a fresh process in an
empty directory, offline: the documented API is the API."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "launch" / "README.md"]


def python_blocks() -> list[tuple[str, int, str]]:
    """``(file name, line of the opening fence, code)`` of each ```python block."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            blocks.append((doc.relative_to(REPO).as_posix(), text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, BLOCKS  # the Python API and the Trainer examples at least


@pytest.mark.parametrize("doc,line,code", BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_readme_python_block_runs(doc, line, code, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"{doc} line {line} failed:\n{res.stderr[-3000:]}"
