"""Imports run one way: every module of greg_fast imports only modules of its own layer or below, in
the layering the README's "How the code is laid out" draws (imports inside functions count), and
no two modules import each other through any path."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bottom to top, as in the README; a module may import its own layer's modules and any below
LAYERS = [
    ["units", "ties", "weights", "export", "exact", "capture", "hyper", "table", "timing", "guard", "atomic", "ops", "models", "data", "plots",
     "kernels", "kernels.greg_step", "groups.registry", "job.checkpoints"],
    ["result", "groups.values", "groups.stored"],
    ["masks", "refusals", "groups.walk"],
    ["backend.base", "backend.eager", "backend.fallback", "backend.cpp", "backend.triton", "backend",
     "schedule", "budget", "compaction", "sparse", "groups.layers", "groups.norms", "groups.arithmetic",
     "groups.shapes", "groups.reductions", "groups.attention", "groups.single", "groups"],
    ["slices"],
    ["plan"],
    ["regularizer", "inner", "engine"],
    ["io", "hf", "trainers", "lightning", "train", "bench", "recipes"],
    ["job.settings", "job.loop", "job.report", "job.run", "job"],
    ["compare", "cli", ""],  # "": the package's __init__, the top
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def modules() -> dict[str, Path]:
    out = {}
    for f in (ROOT / "greg_fast").rglob("*.py"):
        parts = f.relative_to(ROOT / "greg_fast").with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = f
    for f in (ROOT / "kernels").glob("*.py"):
        out["kernels" + ("" if f.stem == "__init__" else "." + f.stem)] = f
    return out


def imports(name: str, path: Path, known) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("greg_fast"):
            base = node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("greg_fast")}
            continue
        else:
            continue
        prefix = ".".join(base)
        subs = {f"{prefix}.{a.name}".lstrip(".") for a in node.names} & known
        found |= subs if len(subs) == len(node.names) else subs | {prefix}
    return (found & known) - {name}


def test_every_module_sits_in_a_layer_and_imports_only_downward():
    mods = modules()
    assert set(mods) == set(LAYER), f"modules missing from LAYERS: {sorted(set(mods) - set(LAYER))}; " \
                                    f"gone: {sorted(set(LAYER) - set(mods))}"
    upward = [f"{m} (layer {LAYER[m]}) imports {t} (layer {LAYER[t]})"
              for m, p in mods.items() for t in imports(m, p, set(mods)) if LAYER[t] > LAYER[m]]
    assert not upward, upward


def test_no_import_cycle():
    mods = modules()
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])
