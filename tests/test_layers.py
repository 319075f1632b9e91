"""The package's layers, checked on its import graph (every import, those inside functions
too): a module may import its own layer and the layers below it, never one above.

    0 utils  ->  1 data, text, image_encoder, i2v  ->  2 models  ->  3 diffusion, losses, metrics
      ->  4 lit  ->  5 entry points: sample, evaluate, run, tools

KNOWN lists the upward imports that are allowed to remain (none today). A new one fails
the test, and so does removing one without taking it off the list, so the list stays exact.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vidgen"
LAYERS = {"utils": 0, "data": 1, "text": 1, "image_encoder": 1, "i2v": 1, "models": 2, "diffusion": 3,
          "losses": 3, "metrics": 3, "lit": 4, "sample": 5, "evaluate": 5, "run": 5, "tools": 5}
KNOWN: set[tuple[str, str]] = set()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "vidgen" and node.level == 0:
            names.update(f"vidgen.{a.name}" for a in node.names)  # from vidgen import text
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("vidgen.")}


def test_no_module_imports_a_layer_above_its_own():
    files = [f for f in sorted(PACKAGE.rglob("*.py")) if f.name != "__init__.py" or f.parent != PACKAGE]
    units = {f.relative_to(PACKAGE).with_suffix("").parts[0] for f in files}
    assert units <= set(LAYERS), f"modules with no layer: {sorted(units - set(LAYERS))} (add them to LAYERS)"
    upward = set()
    for f in files:
        rel = f.relative_to(PACKAGE)
        for name in _imports(f):
            target = name.split(".")[1]
            assert target in LAYERS, f"{rel} imports {name}, which has no layer"
            if LAYERS[target] > LAYERS[rel.parts[0] if len(rel.parts) > 1 else rel.stem]:
                upward.add((rel.as_posix(), name))
    assert upward - KNOWN == set(), f"new upward imports: {sorted(upward - KNOWN)}"
    assert KNOWN - upward == set(), f"gone (take them off KNOWN): {sorted(KNOWN - upward)}"
