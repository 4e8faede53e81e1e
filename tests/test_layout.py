"""The package's shape: imports go one way (no circle), the model file is the model only, modules stay
readable. Read from the source with `ast`: no module is imported to check this."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "gpt"


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    return {
        m: {i.split(".")[1] for i in imports(PACKAGE / f"{m}.py") if i.startswith("gpt.")} & modules for m in modules
    }


def test_no_import_circle_among_the_modules():
    edges = graph()
    done, active = set(), []

    def visit(module):
        assert module not in active, "import circle: " + " -> ".join(active[active.index(module) :] + [module])
        if module in done:
            return
        active.append(module)
        for dep in sorted(edges[module]):
            visit(dep)
        active.pop()
        done.add(module)

    for module in sorted(edges):
        visit(module)
    assert edges["model"] <= {"config", "errors"}  # the bottom: what everything else builds on
    # writing a file safely needs no model: text and data modules reach the file machinery without the loader
    assert edges["atomic"] <= {"errors"}
    for module in ("textfiles", "datafiles", "data"):
        assert "checkpoint" not in edges[module] and "model" not in edges[module], module


def test_the_model_file_is_pure_torch_and_holds_no_decoding():
    found = imports(PACKAGE / "model.py")
    assert not {i for i in found if i.split(".")[0] in ("lightning", "hydra", "omegaconf", "transformers", "peft")}
    source = (PACKAGE / "model.py").read_text()
    for word in ("TorchFunctionMode", "_inductor", "def generate", "def beam_search", "multinomial"):
        assert word not in source, word


def test_no_module_is_over_500_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 500, {k: v for k, v in sizes.items() if v > 500}
