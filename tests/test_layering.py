"""The package's layering, checked on its import graph (every import statement, also inside functions):
no module imports a higher layer, and no two modules import each other, directly or around a cycle.

    L0 mx/, rotation/, architectures.py, paths.py, atomic.py, registration.py   format math, structure, files, bootstrap
    L1 kernels/
    L2 tensors/
    L3 configs.py, inference.py, shared_quant.py, regional_compile.py, gemv_grouping.py, decoder_step.py
    L4 calibration/, moe/
    L5 hf/, eval/, export/
    L6 recipes.py, zoo.py, cli.py, experiments/, the package root
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchao_mx_ext"
LAYERS = {
    "mx": 0, "rotation": 0, "architectures": 0, "paths": 0, "registration": 0, "atomic": 0, "lazy": 0,
    "kernels": 1,
    "tensors": 2,
    "configs": 3, "inference": 3, "shared_quant": 3, "regional_compile": 3, "gemv_grouping": 3, "decoder_step": 3,
    "calibration": 4, "moe": 4,
    "hf": 5, "eval": 5, "export": 5,
    "recipes": 6, "zoo": 6, "cli": 6, "experiments": 6, "": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str:
    """The longest module or package of ours that ``name`` (relative to the package) names."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(name: str):
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "torchao_mx_ext":
                target = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                yield node.lineno, resolve(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torchao_mx_ext":
                    yield node.lineno, resolve(alias.name.partition(".")[2])


def layer(name: str) -> int:
    return LAYERS[name.split(".")[0]]


GRAPH = {name: {t for _, t in imports_of(name) if t != name} for name in MODULES}


def test_every_module_has_a_layer():
    assert all(name.split(".")[0] in LAYERS for name in MODULES), sorted(MODULES)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{name} (L{layer(name)}) line {line} imports {target} (L{layer(target)})"
        for name in MODULES for line, target in imports_of(name) if layer(target) > layer(name)
    ]
    assert upward == []


def test_no_import_cycles():
    # Edges from a package's __init__ to its own submodules are re-exports, not dependencies.
    graph = {n: {t for t in ts if not (MODULES[n].name == "__init__.py" and t.startswith(n + "."))} for n, ts in GRAPH.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_from_other_modules(name):
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    private = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("torchao_mx_ext")):
            private += [f"line {node.lineno}: {a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == [], f"{name} imports private names of other modules"


def test_the_dense_path_reads_in_five_files():
    # quantize_ -> handler -> tensor subclass -> format math -> kernels: the files a reader opens.
    dense = {"configs", "tensors.rotated_mxfp4_tensor", "mx.quantize", "rotation.rotations", "kernels.cpu_mxfp4_gemv"}
    assert all(name in MODULES for name in dense)
    assert "moe" not in {t.split(".")[0] for t in GRAPH["configs"]}
