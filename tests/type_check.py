"""`make lint`'s type check: mypy over the installed `fluxfarm.shared` and `fluxfarm.producer` packages.

The repository keeps the user's top-level folders (shared/, producer/, worker/) that install as
`fluxfarm.*` (pyproject's package-dir), which mypy cannot follow; so it checks a tree of links laid out as
the installed namespace, with pyproject's [tool.mypy] settings. Exits non-zero on any type error."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"shared": "shared", "producer": "producer", "worker": "worker"}
CHECKED = ("fluxfarm.shared", "fluxfarm.producer")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fluxfarm-types-") as tmp:
        package = Path(tmp) / "fluxfarm"
        package.mkdir()
        for module in (ROOT / "fluxfarm").glob("*.py"):
            (package / module.name).symlink_to(module)
        for name, folder in FOLDERS.items():
            (package / name).symlink_to(ROOT / folder, target_is_directory=True)
        args = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(Path(tmp) / ".cache")]
        for name in CHECKED:
            args += ["-p", name]
        return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
