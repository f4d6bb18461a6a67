"""The layout: imports go one way, from the method up to the command line.

    method    errors, tables, losses, tokens, model,     the paper, top to bottom; wrap: the same
              step, wrap                                 method on any backbone
    data      data, jsonio, runlock, provenance          data path, strict JSON files, run-folder lock, run facts
    speed     speed/                                     lean encoders, memory tracker, device set-up
    trainer   rundir, epoch, train, pipeline             one run: its folder, its steps' books, one process
                                                         or one rank per stage
    study     study/                                     registry, run folders, reproduce, report
    cli       cli, __main__

A module may import from its own layer or below, never above; no two modules import each
other, directly or round a longer loop, also not from inside a function.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "contsup"
LAYERS = [
    ("method", {"__init__", "errors", "tables", "losses", "tokens", "model", "step", "wrap"}),
    ("data", {"data", "jsonio", "runlock", "provenance"}),
    ("speed", {"speed"}),
    ("trainer", {"rundir", "epoch", "train", "pipeline"}),
    ("study", {"study"}),
    ("cli", {"cli", "__main__"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def layer_of(module: str) -> int:
    head = module.split(".")[0]
    for i, (_, members) in enumerate(LAYERS):
        if head in members:
            return i
    raise AssertionError(f"contsup/{module} belongs to no layer of tests/test_layout.py")


def imports_of(path: Path) -> set[str]:
    """contsup modules `path` imports, anywhere in the file (functions included)."""
    module = module_name(path)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("contsup"):
                target = node.module[len("contsup."):] if node.module != "contsup" else ""
            else:
                continue
            for alias in node.names:  # `from . import model` names a module, `from .model import X` does not
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if (PACKAGE / Path(*sub.split("."))).with_suffix(".py").exists()
                        or (PACKAGE / Path(*sub.split("."))).is_dir() else target)
        elif isinstance(node, ast.Import):
            out |= {a.name[len("contsup."):] for a in node.names if a.name.startswith("contsup.")}
    return {m for m in out if m and m != module}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
    assert not wrong, wrong


def test_the_method_never_imports_speed_or_bookkeeping():
    method = LAYERS[0][1]
    for module, targets in graph().items():
        if module.split(".")[0] in method:
            assert all(t.split(".")[0] in method for t in targets), (module, targets)


def test_every_import_names_an_existing_module():
    """A relative import resolved against the wrong package (`from .model` inside study/)
    would otherwise pass the layer test unnoticed."""
    def exists(module):
        path = PACKAGE / Path(*module.split("."))
        return path.with_suffix(".py").exists() or path.is_dir()
    missing = sorted({(m, t) for m, ts in graph().items() for t in ts if not exists(t)})
    assert not missing, missing


def test_no_import_cycle():
    g = graph()
    # a package's __init__ is not an edge of its own: `from . import x` inside study/ means study.x
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in g.get(node, ()):
            if nxt not in g:
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in g:
        if not state.get(node):
            visit(node, [node])


def test_the_checker_sees_imports_inside_functions():
    """The cycle test is only worth something if a lazy import counts: cli.py imports the
    trainer inside cmd_train only, and the checker still sees it."""
    cli = PACKAGE / "cli.py"
    top_level = {n.module for n in ast.parse(cli.read_text()).body if isinstance(n, ast.ImportFrom)}
    assert "train" not in top_level
    assert "train" in imports_of(cli)
