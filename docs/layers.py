"""The layers of the code, read from its imports: `python docs/layers.py` rewrites docs/layers.md.

Reads every module of `p2p/` and `pipelines/` (imports at any depth, so a lazy import is an edge
too), groups modules by package (`p2p/model`, `p2p/store`, `pipelines/serve`, ...) and draws the
package graph as Mermaid, which GitHub renders. `tests/test_layout.py` checks the rules the
picture shows (no circle, nothing in `p2p/` imports Ray or `pipelines`) and that the file is
current, so the picture cannot drift from the code.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("p2p", "pipelines")
OUT = ROOT / "docs" / "layers.md"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for each import in a file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.append((full if full in known else child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the project modules (and `ray`) it imports."""
    known = modules()
    out: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for target, _, _ in imports(path, known):
            top = target.split(".")[0]
            if target in known and target != name:
                targets.add(target)
            elif top == "ray":
                targets.add("ray")
        out[name] = targets
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return found


def package_of(module: str) -> str:
    """Where a module sits in the picture: its folder (p2p/model, pipelines/serve), or itself when it is
    a top-level file (p2p/config.py, pipelines/train.py)."""
    parts = module.split(".")
    path = modules()[module]
    if path.name == "__init__.py":
        return "/".join(parts) if len(parts) > 1 else f"{parts[0]}/__init__.py"
    if len(parts) == 2:
        return f"{parts[0]}/{parts[1]}.py"
    return "/".join(parts[:2])


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for src, targets in edges.items():
        a = package_of(src)
        out[a]
        for t in targets:
            b = "ray" if t == "ray" else package_of(t)
            if a != b:
                out[a].add(b)
    return out


# Small modules every layer may use; drawn as one box, their arrows left out.
UTILITIES = ("p2p/errors.py", "p2p/fs.py", "p2p/hub.py", "p2p/logs.py", "p2p/userkey.py", "p2p/__init__.py",
             "pipelines/__init__.py")


def reduced(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The transitive reduction of an acyclic graph: an arrow another path already implies is left out."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), list(edges.get(start, ()))
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(edges.get(n, ()))
        return seen

    far = {n: set().union(*(reach(m) for m in edges.get(n, ()))) if edges.get(n) else set() for n in edges}
    return {n: {m for m in targets if m not in far[n]} for n, targets in edges.items()}


def mermaid() -> str:
    packages = package_graph(graph())
    drawn = {p: {t for t in targets if t not in UTILITIES} for p, targets in packages.items() if p not in UTILITIES}
    drawn = reduced(drawn)
    counts: dict[str, int] = defaultdict(int)
    for m in modules():
        counts[package_of(m)] += 1
    node = {p: p.replace("/", "_").replace(".", "_") for p in drawn}
    node["ray"] = "ray"
    lines = [
        "# Layers (generated by `python docs/layers.py` from the code's imports; do not edit)",
        "",
        "Each box is a folder of modules (or one top-level module); an arrow is \"imports from\". Arrows that",
        "a longer path already implies are left out, and so are the small modules every layer may use",
        f"({', '.join(u for u in UTILITIES if not u.endswith('__init__.py'))}). `tests/test_layout.py` fails if",
        "this file is out of date, if modules or folders import each other in a circle, or if anything in",
        "`p2p/` imports `pipelines` or Ray.",
        "",
        "```mermaid",
        "graph TD",
    ]
    for p in sorted(drawn):
        label = p if p.endswith(".py") else f"{p}/ ({counts[p]} modules)"
        lines.append(f'  {node[p]}["{label}"]')
    lines.append('  ray(["Ray"])')
    for p in sorted(drawn):
        for t in sorted(drawn[p]):
            lines.append(f"  {node[p]} --> {node[t]}")
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(mermaid())
    print(f"wrote {OUT.relative_to(ROOT)}")
