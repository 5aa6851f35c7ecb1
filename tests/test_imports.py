"""The import graph of kto_scale/ runs one way: launch -> commands -> library -> math.

Commands are the modules a launch script runs (the training loop, precompute, evaluate, export); every
other module is library. A library module never imports a command module, commands do not import one
another, the pure tensor math (loss, logprobs) imports no kto_scale module, and there is no circle.
Imports are read with `ast` (those inside functions count too), so the check needs no import to run.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kto_scale"
COMMANDS = {"trainer", "precompute", "evaluate", "export"}
MATH = {"loss", "logprobs"}


def imported_modules(path: Path) -> set[str]:
    """The kto_scale modules `path` imports (as module names inside the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from kto_scale import trainer` names the module in the alias
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "kto_scale" \
                else [node.module]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("kto_scale.")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    return {m: imported_modules(PACKAGE / f"{m}.py") & modules for m in sorted(modules)}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[module] = "done"
        return None

    for module in graph:
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def test_the_graph_reader_sees_every_form_of_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import kto_scale.loss\nfrom kto_scale import trainer\nfrom kto_scale.engine import Engine\n"
                      "import torch\n\ndef f():\n    from kto_scale.fsdp import FSDPSetup\n")
    assert imported_modules(source) == {"loss", "trainer", "engine", "fsdp"}
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_run_one_way_without_a_circle():
    graph = import_graph()
    assert COMMANDS | MATH <= graph.keys(), "a command or math module was renamed: update this test"
    assert cycle(graph) is None, f"import circle: {' -> '.join(cycle(graph))}"
    wrong = {m: sorted(deps & COMMANDS) for m, deps in graph.items() if deps & COMMANDS}
    assert not wrong, f"modules importing a command module (move the shared code into a library module): {wrong}"
    assert not any(graph[m] for m in MATH), {m: graph[m] for m in MATH}
