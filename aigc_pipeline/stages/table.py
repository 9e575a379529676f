"""The stage table: each pipeline stage's function, command, data inputs, outputs, params sections
and code, in one place.

``dvc.yaml`` declares the same stages for DVC, which runs each one's command line
(:attr:`Stage.command_line`) through the ``aigc`` CLI; the Prefect flows call the same stage
function with the same arguments in-process (:func:`aigc_pipeline.pipeline.run_stage`).
``tests/unit/test_dvc_deps.py`` checks ``dvc.yaml`` against this table and names what differs:
a stage, a command line, an input, an output, a params section, or a package file the stage imports
(its code, :func:`code_files`, computed from the stage modules' import closure) that no ``deps``
entry covers. A missing code dependency would make DVC call a changed stage up to date.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "aigc_pipeline"


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the ``aigc`` subcommand dvc.yaml's cmd runs
    function: str  # ``module:function`` that subcommand calls
    modules: tuple[str, ...]  # what the command runs in the package: their import closure is the stage's code
    per_dataset: bool  # once per registered dataset (dvc.yaml ``foreach``: ``NAME@DATASET``)
    inputs: tuple[str, ...]  # data dependencies, as dvc.yaml writes them (``${...}`` from params.yaml)
    outputs: tuple[str, ...]  # outs and metrics
    params: tuple[str, ...]  # params.yaml sections or keys the stage reads
    arguments: tuple[tuple[str, str], ...]  # the command's options and their values (``${...}`` as above)

    @property
    def command_line(self) -> str:
        """dvc.yaml's ``cmd`` for this stage, before DVC fills in the ``${...}``."""
        return " ".join(["aigc", self.command, *(f"--{option} {value}" for option, value in self.arguments)])


_MODEL = "models/${dataset}-${train.model}"
_EVAL = "eval/${dataset}"

STAGES: tuple[Stage, ...] = (
    Stage(
        name="ingest",
        command="ingest",
        function="aigc_pipeline.stages.ingest:run",
        modules=("aigc_pipeline.stages.ingest",),
        per_dataset=True,
        inputs=("${item.path}",),
        outputs=("data/prepared/${key}",),
        params=("datasets.${key}", "ingest"),
        arguments=(("dataset", "${key}"), ("out", "data/prepared/${key}")),
    ),
    Stage(
        name="augment",
        command="augment",
        function="aigc_pipeline.stages.augment:run",
        modules=("aigc_pipeline.stages.augment",),
        per_dataset=True,
        inputs=("data/prepared/${key}",),
        outputs=("data/augmented/${key}",),
        params=("augment",),
        arguments=(("data", "data/prepared/${key}"), ("out", "data/augmented/${key}")),
    ),
    Stage(
        name="train",
        command="train",
        function="aigc_pipeline.stages.train:run",
        # train.devices > 1 starts train_worker under torchrun
        modules=("aigc_pipeline.stages.train", "aigc_pipeline.stages.train_worker"),
        per_dataset=False,
        inputs=("data/augmented/${dataset}", "data/prepared/${dataset}"),
        outputs=(_MODEL,),
        params=(
            "train",
            # FID over training (fid_progress.csv)
            "evaluate.progress_every",
            "evaluate.progress_samples",
            "evaluate.reference_split",
            "evaluate.inception_weights",
            "evaluate.seed",
        ),
        arguments=(
            ("data", "data/augmented/${dataset}"),
            ("out", _MODEL),
            ("checkpoints", "checkpoints/${dataset}-${train.model}"),
            ("reference", "data/prepared/${dataset}"),
        ),
    ),
    Stage(
        name="evaluate",
        command="evaluate",
        function="aigc_pipeline.stages.evaluate:run",
        modules=("aigc_pipeline.stages.evaluate",),
        per_dataset=False,
        inputs=(_MODEL, "data/prepared/${dataset}"),
        outputs=(f"{_EVAL}/samples.png", f"{_EVAL}/copies.png", f"{_EVAL}/evaluation.json", f"{_EVAL}/metrics.json"),
        params=("evaluate",),
        arguments=(("model", _MODEL), ("reference", "data/prepared/${dataset}"), ("out", _EVAL)),
    ),
    Stage(
        name="register",
        command="register",
        function="aigc_pipeline.stages.register:run",
        modules=("aigc_pipeline.stages.register",),
        per_dataset=False,
        inputs=(
            _MODEL,
            f"{_EVAL}/metrics.json",
            f"{_EVAL}/evaluation.json",
            f"{_EVAL}/samples.png",
            f"{_EVAL}/copies.png",
        ),
        outputs=("registry/${dataset}-${train.model}.json",),
        params=("register",),
        arguments=(
            ("model", _MODEL),
            ("evaluation", _EVAL),
            ("receipt", "registry/${dataset}-${train.model}.json"),
        ),
    ),
)

PER_DATASET_STAGES = tuple(s.name for s in STAGES if s.per_dataset)
MODEL_STAGES = tuple(s.name for s in STAGES if not s.per_dataset)


def stage(name: str) -> Stage:
    """The table's entry for ``name`` (``ingest@digits`` -> ``ingest``)."""
    base = name.partition("@")[0]
    for s in STAGES:
        if s.name == base:
            return s
    raise KeyError(f"no stage {name!r} (stages: {', '.join(s.name for s in STAGES)})")


def code_files(entry: Stage, root: Path) -> set[Path]:
    """The package files (relative to ``root``, the repository) ``entry``'s modules import,
    directly or not, at module level or inside a function; read with ``ast``, nothing imported."""
    todo, seen = list(entry.modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(root, name)
        if path is None:
            raise FileNotFoundError(f"stage {entry.name}: no source file for module {name} under {root}")
        todo.extend(_imports(root, name, path) - seen)
    return {p.relative_to(root) for p in (_module_file(root, name) for name in seen) if p is not None}


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
