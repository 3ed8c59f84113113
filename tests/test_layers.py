"""The runtime's layers import only downward (docs/architecture.md, "Layout"); the torch
side (export/, training/) and scripts/ are reached only where the layout says."""

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
            if node.level:
                up = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{up}.{node.module}" if node.module else up
                names = [base] if node.module else [f"{up}.{a.name}" for a in node.names]
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


# -- the torch side (export/, training/) and scripts/ -------------------------------------
TORCH_SIDE = ("ddpm_rt.training", "ddpm_rt.export")
# Below the CLI, only the bench's torch rows reach the torch side, and only by name inside
# a function (``ddpm_rt.extras.optional``, a child ``python -m``), never by an import line.
BENCH_TORCH_ROWS = {"tools/bench.py", "tools/bench_probe.py"}


def _module_of(path: Path) -> str:
    rel = path.relative_to(RUNTIME).with_suffix("")
    return ".".join(["ddpm_rt", *rel.parts]).removesuffix(".__init__")


def _walk_noting_laziness(node, lazy=False):
    """(node, inside a function?) for every node below ``node``."""
    for child in ast.iter_child_nodes(node):
        yield child, lazy
        inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk_noting_laziness(child, inner)


def _runtime_reaches(path: Path):
    """(target, line, lazily, how) for each module of ``path`` (in runtime/) imports, by an
    import line (relative ones resolved) or by name (a string argument of a call)."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node, lazy in _walk_noting_laziness(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, lazy, "import"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for a in node.names:
                yield f"{base}.{a.name}", node.lineno, lazy, "import"
        elif isinstance(node, ast.Call):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if arg.value.startswith(TORCH_SIDE):
                        yield arg.value, node.lineno, lazy, "by name"


def _is_torch_side(target: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in TORCH_SIDE)


def test_runtime_library_never_imports_the_torch_side_and_the_cli_only_lazily():
    """Issue 26: runtime/'s library layers never import ddpm_rt.training or ddpm_rt.export
    (the bench's torch rows name one module, lazily); runtime/cli imports them only inside
    the commands that need them, never at module level."""
    bad = []
    for path in sorted(RUNTIME.rglob("*.py")):
        rel = path.relative_to(RUNTIME).as_posix()
        cli = rel.startswith("cli/")
        for target, line, lazy, how in _runtime_reaches(path):
            if not _is_torch_side(target):
                continue
            where = f"runtime/{rel}:{line} imports {target} ({how}"
            if not lazy:
                bad.append(f"{where}, at module level)")
            elif not cli and not (how == "by name" and rel in BENCH_TORCH_ROWS):
                bad.append(f"{where}, in a library layer)")
    assert not bad, "\n".join(bad)


def test_training_never_imports_export():
    """Issue 26: export/ builds on training/ (the models it traces), never the reverse."""
    bad = [
        f"training/{path.name} imports {t}"
        for path in sorted((ROOT / "training").glob("*.py"))
        for t in _module_imports(path, "ddpm_rt.training")
        if _is_torch_side(t) and t.startswith("ddpm_rt.export")
    ]
    assert not bad, "\n".join(bad)


SCRIPTS = ROOT / "scripts"
# Tests that load a script on purpose, for the script's own code (and why).
SCRIPT_IMPORTS_ALLOWED = {
    "tests/test_goldens.py": "bless_goldens' generators make what the goldens hold",
    "tests/test_emoji.py": "concept_set's rule, checked against the file it wrote",
    "tests/test_mutation_table.py": "the mutation table's patterns, checked against the code",
}
_LOADERS = {"spec_from_file_location", "run_path", "SourceFileLoader", "import_module"}


def _script_imports(path: Path):
    """(script, line) for each way ``path`` imports from scripts/: an import of ``scripts``
    or of a script's name, a loader given a path into scripts/, or scripts/ put on
    sys.path."""
    names = {p.stem for p in SCRIPTS.glob("*.py")} | {"scripts"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            heads = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] * (node.level == 0)
            )
            for head in heads:
                if head.split(".")[0] in names:
                    yield head.split(".")[0], node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            on_path = name in ("insert", "append") and ast.unparse(node.func).startswith(
                "sys.path."
            )
            text = ast.unparse(node)
            if (name in _LOADERS or on_path) and "scripts" in text:
                found = [s for s in sorted(names - {"scripts"}) if s in text]
                yield (found[0] if found else "scripts"), node.lineno


def test_nothing_imports_from_scripts():
    """Issue 26: scripts/ is a folder of standalone scripts; runtime/, export/, training/
    and tests/ import nothing from it (but the tests named in SCRIPT_IMPORTS_ALLOWED)."""
    bad, seen = [], set()
    for folder in ("runtime", "export", "training", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for script, line in _script_imports(path):
                if rel in SCRIPT_IMPORTS_ALLOWED:
                    seen.add(rel)
                else:
                    bad.append(f"{rel}:{line} imports from scripts/ ({script})")
    assert not bad, "\n".join(bad)
    stale = set(SCRIPT_IMPORTS_ALLOWED) - seen
    assert not stale, f"no longer import from scripts/, drop from SCRIPT_IMPORTS_ALLOWED: {stale}"
