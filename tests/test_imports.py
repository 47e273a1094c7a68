"""The layering of the packages, read from the source with `ast` (every import statement,
those inside functions and `if TYPE_CHECKING:` too): no library package imports an engine, a
stub or a tool; an engine imports no other engine (a stub may use the stubs' shared package);
and the library modules import each other without a cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from voicepipe import engines as registry
from voicepipe.processes import PROJECT_ROOT

LIBRARIES = ("voicepipe", "orchestrator", "voicepipe_client", "gateway")
TOOLS = ("voicepipe_tools", "tests", "bench")
ENGINES = {engine.module: engine for engine in registry.ENGINES}


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((PROJECT_ROOT / package).rglob("*.py"))}


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """The modules `path` imports; `from package import name` counts as the submodule
    package.name when that is one of `known`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in known else node.module


def top_level(module: str) -> str:
    return module.partition(".")[0]


def forbidden_for(package: str) -> set[str]:
    """The top-level packages `package` must not import."""
    engine = ENGINES.get(package)
    stubs = {registry.STUB_SUPPORT} if engine is None or not engine.is_stub else set()
    return (set(ENGINES) - {package}) | stubs | set(TOOLS)


PACKAGES = [*LIBRARIES, *ENGINES]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_no_engine_stub_or_tool(package: str) -> None:
    modules = modules_of(package)
    forbidden = forbidden_for(package)
    found = sorted(
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in imported(path, set(modules))
        if top_level(target) in forbidden
    )
    assert found == []


def test_the_rule_catches_an_engine_imported_by_a_library(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text("def speaker():\n    from tts_espeak.speaker import EspeakSpeaker\n")
    assert [top_level(m) for m in imported(source, set())] == ["tts_espeak"]
    assert "tts_espeak" in forbidden_for("voicepipe_client")
    assert "stubs" in forbidden_for("tts_piper") and "stubs" not in forbidden_for("tts_stub")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_library_modules_import_each_other_without_a_cycle() -> None:
    modules = {name: path for package in LIBRARIES for name, path in modules_of(package).items()}
    graph = {
        name: {target for target in imported(path, set(modules)) if target in modules and target != name}
        for name, path in modules.items()
    }
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_loop() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
