"""The house rules of the tree: docs/architecture.md resolves every § citation, no module over 400
lines, at most 6 flat modules at the package top, and no import cycle between the package's modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blip3o_fast"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CITATION = re.compile(r"§(\d+(?:\.\d+)*)")
MAX_LINES = 400


def _sources() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder, patterns in ((PACKAGE, ("*.py",)), (ROOT / "tests", ("*.py",)), (ROOT / "bench", ("*.py", "*.sh")),
                             (ROOT / "csrc", ("*.cpp", "*.h", "*.cu", "*.cuh")), (ROOT / "cpp_tests", ("*.cpp",)),
                             (ROOT / "docs", ("*.md",))):
        for pattern in patterns:
            files += sorted(folder.rglob(pattern))
    return [f for f in files if f != ARCHITECTURE and f != Path(__file__)]


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_every_section_citation_resolves_in_architecture_md():
    headings = set(re.findall(r"^#+ §(\d+(?:\.\d+)*) ", ARCHITECTURE.read_text(), re.M))
    assert headings, "docs/architecture.md has no numbered sections"
    unresolved = []
    for path in _sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "DESIGN §" in line:
                unresolved.append(f"{path.relative_to(ROOT)}:{n}: cites a design brief that is not in the repository")
            for section in CITATION.findall(line):
                if section not in headings:
                    unresolved.append(f"{path.relative_to(ROOT)}:{n}: §{section}")
    assert not unresolved, "\n".join(unresolved)


def test_no_module_is_over_400_lines_and_few_modules_sit_at_the_top():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules().values()}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, f"split these by responsibility: {long}"
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= 6, f"flat modules at blip3o_fast/: {flat}; put them in the part they belong to"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, anywhere in it (an import inside a function is still a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import submodule` depends on the submodule itself
                target = f"{source}.{alias.name}"
                found.add(target if target in modules else source)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
