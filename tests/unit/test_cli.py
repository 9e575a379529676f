"""The command line never exits the process from `cli.run_command` (it runs inside Prefect tasks):
a command line that does not parse is a typed error naming the command, the argument and, from
dvc.yaml, the stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc_pipeline import cli
from aigc_pipeline.errors import AigcError


@pytest.mark.parametrize(
    ("argv", "command", "named"),
    [
        (["train", "--data", "d", "--out", "o", "--checkpoints", "c", "--bogus", "1"], "aigc train", "--bogus"),
        (["train", "--data", "d"], "aigc train", "--out, --checkpoints"),
        (["ingest", "--out", "o", "--size", "abc"], "aigc ingest", "argument --size: invalid int value: 'abc'"),
        (["no-such-command"], "aigc", "invalid choice: 'no-such-command'"),
        (["dataset", "add", "only-a-name"], "aigc dataset add", "source"),
    ],
)
def test_bad_arguments_raise_a_typed_error_instead_of_exiting(argv: list[str], command: str, named: str) -> None:
    with pytest.raises(cli.UsageError) as excinfo:
        cli.run_command(argv)  # SystemExit (argparse's sys.exit(2)) would fail this test
    error = excinfo.value
    assert isinstance(error, AigcError) and error.status == 2
    assert error.command == command and str(error).startswith(f"{command}: ")
    assert named in str(error)


def test_main_prints_one_line_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--data", "d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aigc: error: aigc train: the following arguments are required: --out, --checkpoints")


def test_help_still_prints_and_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr()
    assert "--checkpoints CHECKPOINTS" in out.out and "error" not in out.err


def test_a_dvc_yaml_command_other_than_the_tables_fails_the_stage_not_the_process(project: Path) -> None:
    """A real DVC project whose ingest stage carries an argument the stage table does not: the flow
    calls the stage function with the table's arguments, so it refuses to run what `dvc repro`
    would run differently, naming both command lines, and writes nothing."""
    from aigc_pipeline.pipeline import PipelineError, run_stage

    dvc_yaml = project / "dvc.yaml"
    text = dvc_yaml.read_text()
    good = "cmd: aigc ingest --dataset ${key} --out data/prepared/${key}"
    assert good in text
    dvc_yaml.write_text(text.replace(good, good + " --workers 3"))

    with pytest.raises(PipelineError) as excinfo:
        run_stage(project, "ingest@digits")
    assert str(excinfo.value) == (
        "dvc.yaml: stage 'ingest@digits' runs 'aigc ingest --dataset digits --out data/prepared/digits --workers 3', "
        "but the stage table (aigc_pipeline/stages/table.py) runs "
        "'aigc ingest --dataset digits --out data/prepared/digits': `dvc repro` and the flow would differ"
    )
    assert not (project / "data" / "prepared" / "digits").exists()
