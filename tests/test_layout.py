"""The code's shape, checked: the layers docs/layers.md draws hold, and that picture is current.

docs/layers.py reads every import of `p2p/` and `pipelines/`, at any depth. These are rules of the
design (docs/design.md, section 2), not style: a circle or a library module that reaches up into
Ray is the kind of change that is cheap to make and expensive to undo.
"""

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("layers", ROOT / "docs" / "layers.py")
layers = importlib.util.module_from_spec(spec)
sys.modules["layers"] = layers
spec.loader.exec_module(layers)

LONG = 60  # lines a function may have without saying why in its docstring


def test_no_module_imports_itself_through_a_circle():
    assert layers.cycles(layers.graph()) == []


def test_no_folder_imports_itself_through_a_circle():
    assert layers.cycles(layers.package_graph(layers.graph())) == []


def test_the_library_never_imports_ray_or_pipelines():
    reaching_up = {m: sorted(t for t in targets if t == "ray" or t.startswith("pipelines"))
                   for m, targets in layers.graph().items() if m.startswith("p2p")}
    assert {m: t for m, t in reaching_up.items() if t} == {}


def test_imports_inside_functions_say_why():
    """Imports belong at the top of a module; the few that must wait say so on their line (`# lazy: ...`)."""
    known = layers.modules()
    unexplained = []
    for path in known.values():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)) and "# lazy" not in lines[sub.lineno - 1]:
                        unexplained.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    assert unexplained == []


def test_long_functions_say_why_in_their_docstring():
    too_long = []
    for path in layers.modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > LONG and "Long because" not in doc and "Long on purpose" not in doc:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert too_long == []


def test_the_layers_picture_is_current():
    assert (ROOT / "docs" / "layers.md").read_text() == layers.mermaid(), "run: python docs/layers.py"
