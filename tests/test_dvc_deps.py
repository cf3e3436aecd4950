"""dvc.yaml's code deps are true: each stage lists exactly the ``src/vaelab`` modules it runs
(its ``-m vaelab.X`` module and every vaelab module reached through imports, read with ast), so
`dvc repro` re-runs a stage when, and only when, code it runs has changed."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from tests.conftest import PROJECT
from vaelab import imports

STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
# Commands with a main() that are not DVC stages (Makefile targets).
COMMANDS = (
    "vaelab.bench",
    "vaelab.compare",
    "vaelab.presets",
    "vaelab.register",
    "vaelab.reproduce",
    "vaelab.search",
    "vaelab.sweep",
    "vaelab.tracking.ui",
)


def stage_module(stage: dict) -> str:
    (module,) = re.findall(r"-m (vaelab\.\w+)", stage["cmd"])
    return module


def listed_code(stage: dict) -> set[str]:
    return {dep for dep in stage["deps"] if dep.startswith("src/vaelab/")}


def reached_code(module: str) -> set[str]:
    return {
        f"src/{path.relative_to(imports.SOURCE.parent).as_posix()}"
        for path in imports.reached_files(module)
    }


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_lists_exactly_the_code_it_runs(name):
    stage = STAGES[name]
    reached, listed = reached_code(stage_module(stage)), listed_code(stage)
    assert not reached - listed, f"dvc.yaml stage {name!r} lacks deps {sorted(reached - listed)}"
    assert not listed - reached, (
        f"stage {name!r} lists code it never runs: {sorted(listed - reached)}"
    )


def test_no_stage_or_command_runs_another_stage_or_command():
    entry_points = {stage_module(stage) for stage in STAGES.values()} | set(COMMANDS)
    for module in entry_points:
        others = set(imports.reached_modules(module)) & (entry_points - {module})
        assert not others, f"{module} imports {sorted(others)}; move what it needs to a module"


def test_imports_are_followed_through_every_form_of_import_statement(tmp_path, monkeypatch):
    """``import vaelab.x``, ``from vaelab import x``, ``from vaelab.x import name``, imports
    inside functions, a subpackage and its __init__, transitively; names that are not modules
    and other packages are not."""
    package = tmp_path / "vaelab"
    package.mkdir()
    sources = {
        "__init__.py": '"""docstring only"""\n',
        "stage.py": "import os\nimport vaelab.a\nfrom vaelab import b\nimport vaelab.sub.inner\n",
        "a.py": "from vaelab.c import something\n",
        "b.py": "def lazy():\n    from vaelab import d\n",
        "c.py": "something = 1\n",
        "d.py": "import numpy\n",
        "unused.py": "",
        "sub/__init__.py": "",
        "sub/inner.py": "from vaelab.c import something\n",
    }
    (package / "sub").mkdir()
    for name, text in sources.items():
        (package / name).write_text(text)
    monkeypatch.setattr(imports, "SOURCE", package)
    assert imports.reached_modules("vaelab.stage") == [
        "vaelab",
        "vaelab.a",
        "vaelab.b",
        "vaelab.c",
        "vaelab.d",
        "vaelab.stage",
        "vaelab.sub",
        "vaelab.sub.inner",
    ]


def test_the_checkpoint_fingerprints_the_train_stage_s_code(tiny_params):
    from vaelab.checkpoints import training_config

    config = training_config(tiny_params, torch.device("cpu"))
    fingerprinted = {key.removeprefix("code.") for key in config if key.startswith("code.")}
    assert fingerprinted == set(imports.reached_modules(stage_module(STAGES["train"])))


def test_a_relative_import_is_refused_not_missed(tmp_path, monkeypatch):
    package = tmp_path / "vaelab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text("from . import helper\n")
    (package / "helper.py").write_text("")
    monkeypatch.setattr(imports, "SOURCE", package)
    with pytest.raises(ValueError, match=r"stage.py:1: relative import"):
        imports.reached_modules("vaelab.stage")


def test_a_package_s_data_files_are_the_code_of_its_init(tmp_path, monkeypatch):
    """A page's HTML, JavaScript and CSS beside a package's __init__.py (read with
    importlib.resources) are that module's code: a stage that reaches it lists them."""
    package = tmp_path / "vaelab"
    (package / "page").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text("from vaelab.page import render\n")
    (package / "page" / "__init__.py").write_text("def render(): ...\n")
    for name in ("page.html", "page.js", "page.css"):
        (package / "page" / name).write_text("x")
    (package / "page" / "__pycache__").mkdir()
    monkeypatch.setattr(imports, "SOURCE", package)
    files = [p.relative_to(package).as_posix() for p in imports.reached_files("vaelab.stage")]
    assert files == [
        "__init__.py",
        "page/__init__.py",
        "page/page.css",
        "page/page.html",
        "page/page.js",
        "stage.py",
    ]
