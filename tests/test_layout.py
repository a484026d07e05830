"""The package's layering: no module under src/doe_ext imports another module's private name (a name
starting with `_` that is not itself a module), none imports from the repository's experiments/, and no
two modules import each other, directly or round a circle (imports inside functions count: they only
hide a circle)."""
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


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the doe_ext modules it imports (``from pkg import submodule`` is an edge to the
    submodule; the package's own __init__ runs first anyway, as for any submodule)."""
    mods, graph = modules(), {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("doe_ext"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                deps |= subs or ({node.module} & mods.keys())
                if subs and len(subs) < len(node.names):
                    deps |= {node.module} & mods.keys()
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & mods.keys()
        graph[name] = deps - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, count = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = count[0]
        count[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circles_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert not circles(import_graph())


def test_the_evaluation_harness_and_inference_never_import_training():
    graph, training = import_graph(), {"doe_ext.dmoe.train", "doe_ext.dmoe.build", "doe_ext.dmoe.distill",
                                       "doe_ext.dmoe.reader_training", "doe_ext.dmoe.deep"}
    for start in ("doe_ext.dmoe.evaluate", "doe_ext.dmoe.model", "doe_ext.dmoe.bank"):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        assert not seen & training, (start, sorted(seen & training))


def test_per_call_state_has_one_way_in():
    """Per-call state reaches wrapped modules through a scope (doe_ext.nn.scope) only: no hook that
    reads or rewrites a model's keyword arguments (a keyword slipped through a base model's call and
    popped on the way in), no module-level context variable of its own."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name.startswith("register_forward") and any(k.arg == "with_kwargs" for k in node.keywords):
                bad.append((rel, node.lineno, "a forward hook with the call's keywords"))
            if name in ("pop", "get") and "kwargs" in getattr(getattr(node.func, "value", None), "id", "") \
                    and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("doe_"):
                bad.append((rel, node.lineno, f"keyword {node.args[0].value!r} taken from a call"))
            if name == "ContextVar" and rel != "doe_ext/nn/scope.py":
                bad.append((rel, node.lineno, "a context variable outside doe_ext.nn.scope"))
    assert not bad, bad


def test_no_file_of_the_library_is_over_500_lines():
    long = {str(p.relative_to(SRC.parent)): n for p in sorted(SRC.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
