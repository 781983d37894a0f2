"""The import floors (tests/lint_layers.py, run by `make lint`): the tree keeps them, and a broken
floor is caught with the file, the line and the rule."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lint_layers import FOLDERS, violations

REPO = Path(__file__).resolve().parents[2]
LINT = REPO / "tests" / "lint_layers.py"


def test_the_tree_keeps_every_floor() -> None:
    assert violations(REPO) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for folder in FOLDERS.values():
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize(
    ("file", "line", "rule"),
    [
        ("producer/client.py", "import fluxfarm.worker", "producer never imports worker"),
        ("shared/jobs.py", "from fluxfarm.producer.client import FarmClient", "shared is the vocabulary"),
        ("producer/status.py", "    import torch", "the client installs light"),
        ("worker/quant/gguf/blocks.py", "from fluxfarm.worker.serve import tasks", "worker floors"),
        ("worker/model/plan.py", "from ..tools import bench", "tools are imported only by the command line"),
        ("worker/serve/tasks.py", "from fluxfarm.worker import main", "worker floors"),
    ],
)
def test_a_broken_floor_fails_the_lint(tree: Path, file: str, line: str, rule: str) -> None:
    path = tree / file
    source = path.read_text()
    if line.startswith(" "):  # a lazy import, inside a function, counts too
        source += f"\n\ndef _lazy() -> None:\n{line}\n"
    else:
        source += f"\n{line}\n"
    path.write_text(source)
    run = subprocess.run([sys.executable, LINT, tree], capture_output=True, text=True)
    assert run.returncode == 1
    assert f"{file}:" in run.stdout and rule in run.stdout, run.stdout
    assert len(run.stdout.splitlines()) >= 1
