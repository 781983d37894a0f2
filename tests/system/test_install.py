"""What a user's `pip install .` gets: one `fluxfarm` namespace, a client that needs no torch, and a
command line that fails like a command line. Built from a copy of the tree into a fresh virtual
environment, so nothing of the repository's folders or of the test venv's editable install is seen."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from tests.lint_layers import FOLDERS as PACKAGE_FOLDERS  # pyproject's package-dir

REPO = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 900


def _tracked_tree(dest: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored): what a clone would build from."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install .` of the tree, no extras: the light client a producer installs."""
    work = tmp_path_factory.mktemp("install")
    source = _tracked_tree(work / "src")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    subprocess.run(
        [env_dir / "bin" / "python", "-m", "pip", "install", "-q", str(source)],
        check=True,
        timeout=PIP_TIMEOUT_S,
    )
    return env_dir


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command of the fresh venv outside the repository, without our settings or PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLUXFARM_", "PYTHON"))}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_pyproject_lists_every_package_of_the_tree() -> None:
    """A folder with an `__init__.py` that pyproject does not list would be missing from the wheel."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == PACKAGE_FOLDERS
    in_tree = set()
    for package, folder in PACKAGE_FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            in_tree.add(".".join((package, *parts)))
    assert set(tool["packages"]) == in_tree


def test_no_module_imports_the_old_top_level_names() -> None:
    """Every import inside the project names `fluxfarm.…`: a bare `shared`/`producer`/`worker` would
    only work from the repository's root and break every installed copy."""
    old = {"shared", "producer", "worker"}
    offenders = []
    for folder in [*PACKAGE_FOLDERS.values(), "tests"]:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in old]
    assert offenders == []


@pytest.mark.slow
def test_a_plain_install_is_one_fluxfarm_namespace(client_venv: Path, tmp_path: Path) -> None:
    python = client_venv / "bin" / "python"
    public = _run(
        python, "-c", "from fluxfarm import FarmClient, RenderJob, InvalidJob; import fluxfarm.worker", cwd=tmp_path
    )
    assert public.returncode == 0, public.stderr
    for name in ("worker", "shared", "producer"):
        old = _run(python, "-c", f"import {name}", cwd=tmp_path)
        assert old.returncode != 0
        assert f"No module named '{name}'" in old.stderr


@pytest.mark.slow
def test_the_client_commands_run_without_torch(client_venv: Path, tmp_path: Path) -> None:
    """A client-only install runs `fluxfarm --help` and `fluxfarm submit --help`, and neither imports
    torch (checked in the process that ran them, not only by the absence of the package)."""
    python = client_venv / "bin" / "python"
    probe = (
        "import sys\n"
        "from fluxfarm.cli import main\n"
        "sys.argv = ['fluxfarm', *sys.argv[1:]]\n"
        "try:\n    main()\n"
        "except SystemExit as exit:\n"
        "    heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "    print('HEAVY', heavy, 'EXIT', exit.code)\n"
    )
    for args in ([], ["submit"]):
        run = _run(python, "-c", probe, *args, "--help", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert "HEAVY [] EXIT 0" in run.stdout, run.stdout
        assert "Usage: fluxfarm" in run.stdout
    script = _run(client_venv / "bin" / "fluxfarm", "submit", "--help", cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert "--dataset" in script.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["cancel", "big"], "Missing option '--dataset'"),
        (["status", "--bogus"], "No such option: --bogus"),
        (["submit", "--priority", "sideways"], "Invalid value for '--priority'"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_print_the_usage_and_exit_2(
    client_venv: Path, tmp_path: Path, args: list[str], reason: str
) -> None:
    run = _run(client_venv / "bin" / "fluxfarm", *args, cwd=tmp_path)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr + run.stdout
    assert run.stderr.startswith("Usage: fluxfarm"), run.stderr
    assert reason in run.stderr, run.stderr


def test_the_repository_is_not_what_tests_import() -> None:
    """The suite runs against the installed namespace: `fluxfarm.shared` is the repository's
    `shared/` through the install's mapping, not a second copy."""
    import fluxfarm.shared

    assert Path(fluxfarm.shared.__file__).resolve() == REPO / "shared" / "__init__.py"
    assert sys.modules.get("shared") is None


def test_every_public_name_resolves() -> None:
    import fluxfarm

    assert sorted(fluxfarm.__all__) == sorted(fluxfarm._EXPORTS)
    for name in fluxfarm.__all__:
        assert getattr(fluxfarm, name) is not None
    assert issubclass(fluxfarm.InvalidJob, fluxfarm.FarmError)
    with pytest.raises(AttributeError):
        fluxfarm.no_such_name  # noqa: B018
