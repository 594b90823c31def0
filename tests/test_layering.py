"""The layering contract: which of our packages may import which (docs/ARCHITECTURE.md's table is
this one). Every import counts, also those inside functions: a lazy import is still a dependency.

A failure here means a new arrow between packages. Either the code belongs in another package, or
the table changes on purpose (and then docs/ARCHITECTURE.md with it)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_trainer"

# package -> the packages of ours it may import. Top-level modules (cli.py, __main__.py) are the
# package "(top)". Lower rows never import higher ones.
ALLOWED: dict[str, set[str]] = {
    "storage": set(),
    "config": {"storage"},
    "data": {"storage"},
    "diffusion": set(),
    "lora": {"storage"},
    "contracts": {"diffusion", "lora"},
    "training": {"config", "contracts", "data", "diffusion", "lora", "storage"},
    "backbones": {"contracts", "diffusion", "lora", "storage"},
    "datatools": {"backbones", "data"},
    "monitor": {"config", "contracts", "training"},
    "preview": {"contracts", "data", "lora", "storage", "training"},
    "tasks": {"backbones", "config", "contracts", "data", "datatools", "diffusion", "lora", "preview",
              "storage", "training"},
    "app": {"backbones", "config", "contracts", "data", "datatools", "monitor", "preview", "storage",
            "tasks", "training"},
    "webui": {"app", "backbones", "config", "contracts", "diffusion", "lora", "monitor", "preview",
              "storage", "training"},
    "ui": {"app", "config", "storage", "training", "webui"},
    "tools": {"backbones", "tasks"},
    "(top)": {"app", "config", "diffusion", "monitor", "storage", "tools", "training", "ui"},
}

# Arrows that break the table, each from one named file ({(package, imported package): {files}}),
# so that no other file adds one. None today: the last one (config/load.py reading the model file's
# header for the native resolution) moved into the composition root, app/run_config.py.
KNOWN_EXCEPTIONS: dict[tuple[str, str], set[str]] = {}

# The loop stays free of what only a host or a command needs (the contract, said again so
# that widening ALLOWED["training"] by mistake still fails here).
LOOP_NEVER_IMPORTS = {"app", "backbones", "monitor", "preview", "datatools", "tasks", "ui", "webui"}
THIRD_PARTY_NEVER_IN_LOOP = {"diffusers", "gradio", "transformers", "modules"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            # `from . import x` / `from ..lora import network`: x may be a module
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return names


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lora_trainer":
        return None
    if len(parts) == 1:
        return "(top)"
    candidate = PACKAGE / parts[1]
    return parts[1] if candidate.is_dir() else "(top)"


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files that make the arrow."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _package_of(_module_name(path))
        assert source is not None
        for name in _imports(path):
            target = _package_of(name)
            if target is not None and target != source:
                rel = path.relative_to(PACKAGE).as_posix()
                graph.setdefault(source, {}).setdefault(target, set()).add(rel)
    return graph


def third_party_imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in _imports(path):
            found.setdefault(name.split(".")[0], set()).add(path.relative_to(PACKAGE).as_posix())
    return found


def test_every_package_is_in_the_table():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages | {"(top)"} == set(ALLOWED), "add the new package to ALLOWED (and to ARCHITECTURE.md)"


def test_packages_import_only_what_the_table_allows():
    wrong = [f"{source} -> {target} ({', '.join(sorted(files - KNOWN_EXCEPTIONS.get((source, target), set())))})"
             for source, targets in package_graph().items()
             for target, files in targets.items()
             if target not in ALLOWED[source] and files - KNOWN_EXCEPTIONS.get((source, target), set())]
    assert not wrong, "imports the layering table does not allow:\n" + "\n".join(wrong)


def test_the_table_has_no_cycles():
    """Also holds for the real imports, as they are a subset of the table."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(ALLOWED[node]):
            assert state.get(nxt) != "open", f"cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for package in sorted(ALLOWED):
        if package not in state:
            visit(package, [])


def test_the_loop_imports_no_host_no_command_and_no_model_library():
    assert not ALLOWED["training"] & LOOP_NEVER_IMPORTS
    assert not set(package_graph().get("training", {})) & LOOP_NEVER_IMPORTS
    leaked = {name: files for name, files in third_party_imports("training").items()
              if name in THIRD_PARTY_NEVER_IN_LOOP}
    assert not leaked, f"the loop imports {leaked}"


def test_the_import_parser_sees_relative_and_lazy_imports():
    """The checker itself: a lazy relative import inside a function is found and resolved."""
    doctor = PACKAGE / "app" / "doctor.py"
    assert "lora_trainer.tasks" in _imports(doctor)             # lazy `from ..tasks import task_for`
    assert "lora_trainer.app.session" in _imports(doctor)       # lazy `from .session import …`
    assert "lora_trainer.training.control" in _imports(doctor)  # `from ..training.control import …`
