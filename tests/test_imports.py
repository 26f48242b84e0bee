"""The import graph runs one way: models -> data -> methods -> train / eval -> pipeline -> command line.

Every ``import`` in the package counts, those inside functions too: a lazy import still ties the two
modules together, it only hides the circle until run time.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "booster_jax"

# Layers from the bottom; a module may import its own layer (without a circle) and the layers below it.
LAYERS = [
    ("foundation", ("errors", "files", "rundir")),
    ("models", ("models",)),
    ("settings", ("config", "plugins", "parallel")),  # config reads models.schema; parallel shards the models
    ("data", ("data", "fingerprint")),  # fingerprint identifies data inputs (data.formats reads hub ids)
    ("methods", ("methods",)),
    ("train / eval", ("train", "eval")),
    ("pipeline", ("pipeline", "plan", "export", "prepare_real", "api", "")),  # "" = booster_jax/__init__
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from pkg import mod`` names the module, else the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "booster_jax"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "booster_jax":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def layer(module: str) -> int:
    rest = module.split(".", 1)[1] if "." in module else ""
    top = rest.split(".")[0]
    for i, (_, tops) in enumerate(LAYERS):
        if top in tops:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_imports.py LAYERS; add it where it belongs")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer(m)


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
            for m, deps in g.items() for d in sorted(deps) if layer(d) > layer(m)]


def find_circle(g: dict[str, set[str]]) -> list[str]:
    """One circle of ``g`` as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_upward_import():
    bad = upward_imports(graph())
    assert not bad, "\n".join(bad)


def test_no_circle():
    circle = find_circle(graph())
    assert not circle, "import circle: " + " -> ".join(circle)


def test_the_package_never_imports_the_command_line():
    for m, p in modules().items():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "run" not in names, m


@pytest.mark.parametrize("source, expected", [
    ("from booster_jax.train import stages\nimport booster_jax.eval.evaluate\n",
     {"booster_jax.train.stages", "booster_jax.eval.evaluate"}),
    ("def f():\n    from booster_jax.config import Config\n", {"booster_jax.config"}),
])
def test_the_checker_sees_every_import(tmp_path, source, expected):
    """The graph above is only as good as this parser: lazy imports and ``from pkg import module`` count."""
    f = tmp_path / "m.py"
    f.write_text(source)
    assert imports(f, set(modules())) == expected


def test_the_checker_finds_a_circle_and_an_upward_import():
    g = graph()
    g["booster_jax.models.llama"] = g["booster_jax.models.llama"] | {"booster_jax.train.stages"}
    assert "booster_jax.models.llama (models) imports booster_jax.train.stages (train / eval)" in upward_imports(g)
    circle = find_circle(g)
    assert circle[0] == circle[-1] and "booster_jax.models.llama" in circle and "booster_jax.train.stages" in circle
