"""dvc.yaml's code dependencies against what each stage really imports.

A package file a stage imports (at module level or inside a function) but dvc.yaml does not list
makes DVC call a changed stage up to date: a wrong model and no error. This test computes each
stage's import closure inside ``aigc_pipeline`` from the source (``ast``, no import is executed)
and fails naming every file no ``deps`` entry covers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = "aigc_pipeline"
# The modules dvc.yaml's commands run, per stage (aigc_pipeline/commands.py calls their ``run``).
STAGE_MODULES = {
    "ingest": ["aigc_pipeline.stages.ingest"],
    "augment": ["aigc_pipeline.stages.augment"],
    "train": ["aigc_pipeline.stages.train", "aigc_pipeline.stages.train_worker"],
    "evaluate": ["aigc_pipeline.stages.evaluate"],
    "register": ["aigc_pipeline.stages.register"],
}


def _module_file(root: Path, name: str) -> Path | None:
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(root: Path, name: str, path: Path) -> set[str]:
    """Package modules ``path`` (module ``name``) imports anywhere in its body, and their packages."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            if target.split(".")[0] != PACKAGE:
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
                prefix = ".".join(parts[:i])
                if _module_file(root, prefix) is not None:
                    found.add(prefix)
    return found


def import_closure(root: Path, modules: list[str]) -> set[Path]:
    """Files of every ``aigc_pipeline`` module reachable from ``modules`` through imports."""
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(root, name)
        assert path is not None, f"no source file for module {name}"
        todo.extend(_imports(root, name, path) - seen)
    return {_module_file(root, name).relative_to(root) for name in seen}


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    """The files no dependency (a file, or a folder holding it) covers."""
    covered = [Path(d) for d in deps]
    return sorted(str(f) for f in files if not any(f == d or d in f.parents for d in covered))


def _stage_deps(dvc_yaml: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: list(stage.get("do", stage)["deps"]) for name, stage in stages.items()}


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_dvc_yaml_lists_every_package_file_the_stage_imports(stage: str) -> None:
    deps = _stage_deps(REPO / "dvc.yaml")[stage]
    missing = uncovered(import_closure(REPO, STAGE_MODULES[stage]), deps)
    assert not missing, (
        f"dvc.yaml stage {stage!r} imports {', '.join(missing)} but lists none of them in its "
        "deps: DVC would call the stage up to date after a change there. Add them to dvc.yaml."
    )


def test_the_check_names_a_file_dvc_yaml_lacks(tmp_path: Path) -> None:
    """The same check on a dvc.yaml with one dependency removed fails, naming that file."""
    deps = _stage_deps(REPO / "dvc.yaml")["augment"]
    closure = import_closure(REPO, STAGE_MODULES["augment"])
    assert Path("aigc_pipeline/data/prepared.py") in closure and Path("aigc_pipeline/io.py") in closure
    assert uncovered(closure, [d for d in deps if d != "aigc_pipeline/io.py"]) == ["aigc_pipeline/io.py"]
    assert "aigc_pipeline/data/augment.py" in uncovered(closure, [d for d in deps if d != "aigc_pipeline/data"])
