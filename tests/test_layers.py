"""The runtime's layers import only downward (docs/architecture.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"

# Bottom up. A module may import its own layer and the layers below it.
LAYERS = [
    {"ddpm_rt", "errors", "tolerances", "extras"},
    {"core"},
    {"bundle"},
    {"backends"},
    {"config", "text", "images", "progress", "run", "generator", "parity"},
    {"tools"},
    {"cli", "capi"},
]
# Upward imports made lazily on purpose, each commented where it is made:
# (importing module, imported module).
ALLOWED_UP: set[tuple[str, str]] = set()


def _layer(module: str) -> int:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 and parts[0] == "ddpm_rt" else parts[0]
    if parts == ["ddpm_rt"]:
        head = "ddpm_rt"
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(
        f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md's table)"
    )


def _imports(path: Path, module: str):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ddpm_rt":  # from ddpm_rt import __version__ / a submodule
                for alias in node.names:
                    sub = f"ddpm_rt.{alias.name}"
                    yield (
                        sub
                        if (RUNTIME / alias.name).exists()
                        or (RUNTIME / f"{alias.name}.py").exists()
                        else "ddpm_rt",
                        node.lineno,
                    )
            elif node.module.startswith("ddpm_rt."):
                yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ddpm_rt."):
                    yield alias.name, node.lineno


def test_runtime_imports_only_downward():
    bad = []
    for path in sorted(RUNTIME.rglob("*.py")):
        rel = path.relative_to(RUNTIME).with_suffix("")
        module = ".".join(["ddpm_rt", *rel.parts]).removesuffix(".__init__")
        if module == "ddpm_rt":
            continue  # the public API's lazy names
        mine = _layer(module)
        for target, line in _imports(path, module):
            if target.startswith(("ddpm_rt.training", "ddpm_rt.export", "ddpm_rt.models")):
                continue  # torch-side packages, imported lazily by the commands that need them
            if _layer(target) > mine and (module, target) not in ALLOWED_UP:
                bad.append(f"{path.relative_to(RUNTIME.parent)}:{line} imports {target}")
    assert not bad, "imports running up the layers:\n" + "\n".join(bad)


ROOT = RUNTIME.parent


def _module_imports(path: Path, package: str):
    """Every ddpm_rt module ``path`` imports, lazily or not (relative imports resolved)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = f"{package}.{node.module}" if node.module else package
                names = [base] if node.module else [f"{package}.{a.name}" for a in node.names]
                yield from names
            elif node.module and node.module.startswith("ddpm_rt"):
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("ddpm_rt"))


def test_export_and_training_use_no_runtime_tool_and_export_has_no_import_circle():
    """Issue 26: export/ and training/ may import the runtime's library layers but never its
    tools, CLI or C ABI; and the exporters' modules import each other without a circle."""
    bad, edges = [], {}
    for folder, package in (("export", "ddpm_rt.export"), ("training", "ddpm_rt.training")):
        for path in sorted((ROOT / folder).glob("*.py")):
            me = f"{package}.{path.stem}"
            targets = set(_module_imports(path, package))
            for t in sorted(targets):
                if t.startswith(("ddpm_rt.tools", "ddpm_rt.cli", "ddpm_rt.capi")):
                    bad.append(f"{folder}/{path.name} imports {t}")
            if folder == "export":
                edges[me] = {t for t in targets if t.startswith("ddpm_rt.export.")}
    assert not bad, "\n".join(bad)

    def cycle_from(node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                return [*path[path.index(nxt) :], nxt]
            found = cycle_from(nxt, [*path, nxt])
            if found:
                return found
        return None

    for start in sorted(edges):
        found = cycle_from(start, [start])
        assert found is None, " -> ".join(found)
