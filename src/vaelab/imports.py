"""Which ``vaelab`` modules a stage runs: its module and every ``vaelab`` module reached from it
through ``import`` statements, anywhere in the file (also inside functions), read with ``ast``:
nothing is imported or executed.

A package's data files (any file in its folder that is not Python, such as the explorer page's
``page.html``, ``explorer.js`` and ``explorer.css``, read with ``importlib.resources``) are code of
the package's ``__init__`` module: editing them re-runs the stages that reach it.

dvc.yaml lists exactly these files as each stage's code deps (tests/test_dvc_deps.py checks it),
and a training checkpoint fingerprints the train stage's set (``vaelab.checkpoints``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "vaelab"
SOURCE = Path(__file__).resolve().parent  # src/vaelab


def module_file(module: str) -> Path:
    """``vaelab.train`` -> src/vaelab/train.py; ``vaelab`` -> src/vaelab/__init__.py; a
    subpackage ``vaelab.x`` -> src/vaelab/x/__init__.py."""
    folder = SOURCE.joinpath(*module.split(".")[1:])
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def _imported(module: str) -> set[str]:
    """The ``vaelab`` modules that ``module``'s source imports, directly."""
    found = set()
    path = module_file(module)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            # Not followed here: dvc.yaml and this module would miss the same file together.
            raise ValueError(f"{path}:{node.lineno}: relative import; write `from vaelab...`")
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from vaelab import tracking` imports the module vaelab.tracking.
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    # Importing vaelab.x.y runs vaelab.x's __init__ too.
    found |= {name.rsplit(".", 1)[0] for name in found if "." in name}
    return {
        name
        for name in found
        if (name == PACKAGE or name.startswith(f"{PACKAGE}.")) and module_file(name).is_file()
    }


def reached_modules(module: str) -> list[str]:
    """``module``, the package itself (importing a submodule runs ``__init__``) and every
    ``vaelab`` module reached transitively, sorted."""
    reached, todo = set(), [module, PACKAGE]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(_imported(name) - reached)
    return sorted(reached)


def module_files(module: str) -> list[Path]:
    """``module``'s source file and, for a package, its data files (sorted by name)."""
    source = module_file(module)
    if source.name != "__init__.py":
        return [source]
    data = [
        path
        for path in source.parent.iterdir()
        if path.is_file() and path.suffix not in (".py", ".pyc") and not path.name.startswith(".")
    ]
    return [source, *sorted(data)]


def reached_files(module: str) -> list[Path]:
    """The files of ``reached_modules(module)``: sources and package data (``module_files``)."""
    return [path for name in reached_modules(module) for path in module_files(name)]
