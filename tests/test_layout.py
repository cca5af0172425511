"""The package's import layers (docs/design.md, "Map"): every import points down, never up."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = [
    ("init", {"s3prl_stimulus"}),
    ("foundations", {f"s3prl_stimulus.{m}" for m in ("errors", "io", "resources", "tables", "audio", "seeds", "progress")}),
    ("concepts", {f"s3prl_stimulus.{m}" for m in ("labels", "partition", "loss", "metrics", "agreement", "results",
                                                   "label_files", "paper")}),
    ("integration", {"s3prl_stimulus.integration"}),
    ("downstream", {"s3prl_stimulus.downstream"}),
    ("cache", {"s3prl_stimulus.cache"}),
    ("study", {"s3prl_stimulus.study"}),
    ("entry points", {"s3prl_stimulus.cli", "s3prl_stimulus.commands", "s3prl_stimulus.run_downstream",
                      "s3prl_stimulus.testing", "s3prl_stimulus.testing_upstreams", "s3prl_stimulus.doctor",
                      "s3prl_stimulus.__main__"}),
]


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer of docs/design.md's map: add it there and here")
    return best[0]


def module_files():
    for path in sorted((REPO / "s3prl_stimulus").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    for path in sorted((REPO / "downstream").rglob("*.py")):
        parts = ("s3prl_stimulus",) + path.relative_to(REPO).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            yield name
            for alias in node.names:  # `from s3prl_stimulus import audio` imports a module
                yield f"{name}.{alias.name}"


def test_every_module_is_in_a_layer():
    files = list(module_files())
    assert len(files) > 40
    for _, module in files:
        layer_of(module)


@pytest.mark.parametrize("path,module", list(module_files()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_point_down(path, module):
    own = layer_of(module)
    for name in imported_modules(path, module):
        if not name.startswith("s3prl_stimulus"):
            continue
        try:
            target = layer_of(name)
        except AssertionError:
            continue  # `from s3prl_stimulus import CLASSES`: a name, not a module
        assert target <= own, f"{module} ({LAYERS[own][0]}) imports {name} ({LAYERS[target][0]}): move one of them"
