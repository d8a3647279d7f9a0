"""The house rules that a reviewer would otherwise check by hand."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "gradsift"


def test_no_module_of_the_package_passes_500_lines():
    lengths = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert len(lengths) > 30  # the package was found
    assert {name: n for name, n in lengths.items() if n > 500} == {}


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Per module of the package (dotted name), every `gradsift` import it makes, at any depth (type-only and
    function-level included): (imported module, names)."""
    import ast

    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gradsift":
                found.append((node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.Import):
                found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "gradsift"]
        modules[name] = found
    return modules


def test_no_module_imports_another_modules_private_name():
    private = {
        (module, target, name)
        for module, found in _imports().items()
        for target, names in found
        for name in names
        if name.startswith("_") and not name.startswith("__")
    }
    assert private == set()


def test_the_package_has_no_import_cycle():
    modules = _imports()
    assert "gradsift.continual.checks" in modules and "gradsift.continual.schema" in modules
    graph = {module: set() for module in modules}
    for module, found in modules.items():
        for target, names in found:
            submodules = {f"{target}.{name}" for name in names} & modules.keys()
            graph[module] |= (submodules or {target}) & modules.keys() - {module}
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_online_step_reads_as_algorithm_1_with_trainer_internals_in_one_adapter():
    import ast

    online = ["online.py", "online_step.py", "online_trainer.py", "online_window.py"]
    long = {
        f"{name}:{node.name}": node.end_lineno - node.lineno + 1
        for name in online
        for node in ast.walk(ast.parse((PACKAGE / name).read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    }
    assert long == {}
    # Trainer internals read as attributes, and the marks as string literals: only in the adapter.
    adapter_only = re.compile(
        r"\.(_get_num_items_in_batch|_total_train_tokens|_metrics)\b|[\"']_gradsift_(skip|reused)"
    )
    found = {
        (str(path.relative_to(PACKAGE)), match.group(0))
        for path in PACKAGE.rglob("*.py")
        if path.name != "online_trainer.py"
        for match in adapter_only.finditer(path.read_text(encoding="utf-8"))
    }
    assert found == set()
