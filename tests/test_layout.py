"""The package's layering: no module under src/doe_ext imports another module's private name (a name
starting with `_` that is not itself a module), and none imports from the repository's experiments/."""
import ast
import importlib.util
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "doe_ext"


def imports():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path.relative_to(SRC.parent), node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield path.relative_to(SRC.parent), a.name, []


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_no_module_imports_another_modules_private_name():
    private = [(str(p), f"{m}.{n}") for p, m, names in imports() if m.startswith("doe_ext")
               for n in names if n.startswith("_") and not n.startswith("__") and not is_module(f"{m}.{n}")]
    assert not private, private


def test_the_library_never_imports_the_experiments():
    bad = [(str(p), m) for p, m, _ in imports() if m == "experiments" or m.startswith("experiments.")]
    assert not bad, bad
