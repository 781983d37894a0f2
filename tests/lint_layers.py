"""The import floors of fluxfarm, checked by reading every import of the source tree (`make lint`).

import-linter builds its graph by walking the root package's folder on disk, and fluxfarm's packages
live in other folders (`shared/`, `producer/`, `worker/` map to `fluxfarm.*`), so it would see none of
them. This reads the same thing it would: every `import` and `from … import`, at module level or inside
a function (a lazy import is still an import), resolved to the module it names.

Run: `python tests/lint_layers.py [ROOT]`; prints each broken rule with the file and line, exits 1.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The repository folder of each installed package (pyproject's package-dir).
FOLDERS = {"fluxfarm": "fluxfarm", "fluxfarm.shared": "shared", "fluxfarm.producer": "producer"}
FOLDERS["fluxfarm.worker"] = "worker"
HEAVY = ("torch", "diffusers", "transformers", "triton", "accelerate", "gguf", "safetensors")
"""What only the `[gpu]` extra installs: the client side must never import it, not even lazily."""


@dataclass(frozen=True)
class Rule:
    """Modules under any of `sources` must not import a module under any of `forbidden`, except from a
    module under one of `allowed_from` (the command line that composes both sides)."""

    why: str
    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed_from: tuple[str, ...] = ()


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _floors(*floors: str) -> list[Rule]:
    """A worker room may import the rooms below it, never one above (`a | b`: neither imports the other)."""
    rules = []
    for index, floor in enumerate(floors):
        above = tuple(f"fluxfarm.worker.{room}" for upper in floors[:index] for room in upper.split(" | "))
        rooms = [f"fluxfarm.worker.{room}" for room in floor.split(" | ")]
        for room in rooms:
            siblings = tuple(other for other in rooms if other != room)
            if above or siblings:
                rules.append(Rule(f"worker floors: {room} imports only the rooms below it", (room,), above + siblings))
    return rules


RULES: list[Rule] = [
    Rule("shared is the vocabulary: it imports nothing of producer or worker", ("fluxfarm.shared",),
         ("fluxfarm.producer", "fluxfarm.worker", "fluxfarm.cli", "fluxfarm.demo")),
    Rule("producer never imports worker: the client installs without the GPU stack", ("fluxfarm.producer",),
         ("fluxfarm.worker", "fluxfarm.cli", "fluxfarm.demo")),
    Rule("the client installs light: shared and producer import no GPU package",
         ("fluxfarm.shared", "fluxfarm.producer"), HEAVY),
    Rule("tools are imported only by the command line", ("fluxfarm",), ("fluxfarm.worker.tools",),
         allowed_from=("fluxfarm.cli", "fluxfarm.demo", "fluxfarm.worker.cli", "fluxfarm.worker.tools")),
    *_floors("cli", "main | tools", "serve", "render", "adapters", "model", "fast", "quant.fp8", "quant.gguf"),
]  # fmt: skip


def _module_name(path: Path, folder: Path, package: str) -> str:
    parts = path.relative_to(folder).with_suffix("").parts
    return ".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the tree, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            # `from fluxfarm.worker import tools` imports fluxfarm.worker.tools
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*")


def violations(root: Path) -> list[str]:
    found: dict[tuple[str, int, str], str] = {}  # (file, line, rule) -> the first name that broke it
    for package, folder in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            module = _module_name(path, root / folder, package)
            tree = ast.parse(path.read_text(), str(path))
            for line, imported in _imports(tree, module, path.name == "__init__.py"):
                for rule in RULES:
                    if (
                        _under(module, rule.sources)
                        and _under(imported, rule.forbidden)
                        and not _under(module, rule.allowed_from)
                        and not _under(module, rule.forbidden)  # a room may import its own modules
                    ):
                        found.setdefault((str(path.relative_to(root)), line, rule.why), imported)
    return [f"{file}:{line}: imports {found[file, line, why]}: {why}" for file, line, why in sorted(found)]


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    broken = violations(root)
    for line in broken:
        print(line)
    print(f"import floors: {len(RULES)} rules, {len(broken)} broken", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
