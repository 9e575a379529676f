"""dvc.yaml against the stage table (aigc_pipeline/stages/table.py).

Each stage of the table is in dvc.yaml with the same command line, data inputs, outputs and params,
and dvc.yaml's deps cover every package file the stage imports (its import closure, computed
from the source with ``ast``). A package file a stage imports but dvc.yaml does not list makes
DVC call a changed stage up to date: a wrong model and no error. Each check names what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aigc_pipeline.stages.table import MODEL_STAGES, PER_DATASET_STAGES, STAGES, Stage, code_files, stage
from tests.conftest import REPO


def _dvc_stages(text: str) -> dict[str, dict[str, Any]]:
    return {name: s.get("do", s) | {"foreach": "foreach" in s} for name, s in yaml.safe_load(text)["stages"].items()}


def _paths(entries: list[Any]) -> list[str]:
    """dvc.yaml list entries: a path, or ``{path: options}``."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    """The files no dependency (a file, or a folder holding it) covers."""
    covered = [Path(d) for d in deps]
    return sorted(str(f) for f in files if not any(f == d or d in f.parents for d in covered))


def differences(entry: Stage, declared: dict[str, Any] | None, root: Path = REPO) -> list[str]:
    """What dvc.yaml's ``declared`` stage says differently from the table's ``entry``."""
    if declared is None:
        return [f"stage {entry.name!r} is missing"]
    problems = []
    cmd = " ".join(declared["cmd"].split())
    if cmd != entry.command_line:
        problems.append(f"{entry.name}: cmd is {cmd!r}, the table says {entry.command_line!r}")
    if declared["foreach"] != entry.per_dataset:
        problems.append(
            f"{entry.name}: foreach over datasets is {declared['foreach']}, the table says {entry.per_dataset}"
        )
    deps = _paths(declared.get("deps"))
    data = [d for d in deps if not d.startswith("aigc_pipeline")]
    if data != list(entry.inputs):
        problems.append(f"{entry.name}: data deps {data}, the table says {list(entry.inputs)}")
    outs = _paths(declared.get("outs")) + _paths(declared.get("metrics"))
    if sorted(outs) != sorted(entry.outputs):
        problems.append(f"{entry.name}: outs/metrics {sorted(outs)}, the table says {sorted(entry.outputs)}")
    if list(declared.get("params") or []) != list(entry.params):
        problems.append(f"{entry.name}: params {declared.get('params')}, the table says {list(entry.params)}")
    missing = uncovered(code_files(entry, root), deps)
    if missing:
        problems.append(
            f"{entry.name}: imports {', '.join(missing)} but lists none of them in its deps: "
            "DVC would call the stage up to date after a change there"
        )
    return problems


def test_dvc_yaml_declares_the_stage_table() -> None:
    declared = _dvc_stages((REPO / "dvc.yaml").read_text())
    assert list(declared) == [s.name for s in STAGES]
    problems = [p for s in STAGES for p in differences(s, declared.get(s.name))]
    assert not problems, "dvc.yaml differs from aigc_pipeline/stages/table.py:\n" + "\n".join(problems)
    assert (PER_DATASET_STAGES, MODEL_STAGES) == (("ingest", "augment"), ("train", "evaluate", "register"))
    assert stage("ingest@digits").name == "ingest"


def test_the_check_names_what_dvc_yaml_lacks() -> None:
    """The same check on a dvc.yaml with one code dependency, one output and one params section
    removed fails, naming each."""
    declared = _dvc_stages((REPO / "dvc.yaml").read_text())
    augment, evaluate = stage("augment"), stage("evaluate")
    closure = code_files(augment, REPO)
    assert Path("aigc_pipeline/data/prepared.py") in closure and Path("aigc_pipeline/io.py") in closure
    broken = dict(declared["augment"], deps=[d for d in declared["augment"]["deps"] if d != "aigc_pipeline/io.py"])
    assert differences(augment, broken) == [
        "augment: imports aigc_pipeline/io.py but lists none of them in its deps: "
        "DVC would call the stage up to date after a change there"
    ]
    broken = dict(declared["augment"], deps=[d for d in declared["augment"]["deps"] if d != "aigc_pipeline/data"])
    assert "aigc_pipeline/data/augment.py" in differences(augment, broken)[0]
    broken = dict(declared["augment"], cmd=declared["augment"]["cmd"].replace("--out", "--to"))
    assert differences(augment, broken) == [
        "augment: cmd is 'aigc augment --data data/prepared/${key} --to data/augmented/${key}', "
        "the table says 'aigc augment --data data/prepared/${key} --out data/augmented/${key}'"
    ]
    broken = dict(declared["evaluate"], outs=declared["evaluate"]["outs"][1:], params=[])
    found = differences(evaluate, broken)
    assert len(found) == 2 and "eval/${dataset}/samples.png" in found[0] and "params [], the table" in found[1]
    assert differences(evaluate, None) == ["stage 'evaluate' is missing"]
