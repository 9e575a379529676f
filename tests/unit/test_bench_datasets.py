"""bench datasets: a selection (BENCH_DATASETS*) re-measures part of the zoo and keeps the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.datasets as bd


def _run(fid: float) -> dict[str, float]:
    return {"fid": fid, "precision": 0.5, "recall": 0.5, "floor_fid": 20.0, "floor_precision": 0.8, "floor_recall": 0.8}


def test_a_selection_keeps_the_published_figures_it_did_not_remeasure(tmp_path: Path, monkeypatch) -> None:
    published = tmp_path / "results"
    (published / "datasets").mkdir(parents=True)
    for name in ("mnist-dcgan-600s", "mnist-sngan-600s", "emoji-sngan-600s"):
        (published / "datasets" / f"{name}.png").write_bytes(name.encode())
    monkeypatch.setattr(bd, "RESULTS_DIR", published)
    previous = {
        "date": "2026-12-05T14:11:26+00:00",
        "project": {"git_commit": "0ad8a73d54fb9f93"},
        "raw": {
            "mnist": {"dcgan": {"300": [_run(9)], "600": [_run(58.4)]}, "sngan": {"600": [_run(46.3)]}},
            "emoji": {"sngan": {"600": [_run(174.6)]}},
        },
        "families": {"dcgan": {"width": 64, "lr": 2e-4}, "sngan": {"width": 64, "lr": 4e-4}},
        "exports": {"mnist": {"count": 5000}, "emoji": {"count": 3793}},
        "prepared": {"mnist": {"accepted": 5000}, "emoji": {"accepted": 3741}},
    }
    # This run: sngan on mnist only, at 600 s, with another recipe (width 32, EMA 0.99).
    results = {"mnist": {"sngan": {600.0: [_run(42.5)]}}}
    settings = {"sngan": {"width": 32, "ema_decay": 0.99}}
    exports, prepared = {"mnist": {"count": 5000, "new": True}}, {"mnist": {"accepted": 5000}}
    grids = tmp_path / "grids"
    grids.mkdir()

    notes = bd.carry_over(previous, results, exports, prepared, settings, grids, (600.0,))

    # The new sngan stays; the old one stands beside it under its recipe's label; dcgan is kept as it was.
    assert results["mnist"]["sngan"] == {600.0: [_run(42.5)]}
    assert results["mnist"]["sngan-w64"] == {600.0: [_run(46.3)]}
    assert results["mnist"]["dcgan"] == {600.0: [_run(58.4)]}
    assert results["emoji"] == {"sngan-w64": {600.0: [_run(174.6)]}}
    assert settings["sngan"]["width"] == 32 and settings["sngan-w64"]["ema_decay"] == 0.999
    assert settings["dcgan"]["width"] == 64
    assert exports["mnist"]["new"] and exports["emoji"] == {"count": 3793}
    assert (grids / "mnist-sngan-w64-600s.png").read_bytes() == b"mnist-sngan-600s"
    assert (grids / "emoji-sngan-w64-600s.png").is_file() and (grids / "mnist-dcgan-600s.png").is_file()
    assert len(notes) == 1 and "2026-12-05T14:11:26" in notes[0] and "`0ad8a73d54fb`" in notes[0]
    assert "mnist `sngan-w64`" in notes[0] and "emoji `sngan-w64`" in notes[0] and "mnist `dcgan`" in notes[0]


def test_a_row_carried_twice_still_names_the_run_that_measured_it(tmp_path: Path) -> None:
    # The published run measured vae and carried dcgan over from an older run (its measured_in says so).
    older = {"date": "2026-12-06T16:15:39+00:00", "commit": "d135fa55cd98"}
    previous = {
        "date": "2026-12-07T15:24:03+00:00",
        "project": {"git_commit": "e0e51ca40a6b1234"},
        "raw": {"mnist": {"dcgan": {"600": [_run(62.1)]}, "vae": {"600": [_run(66.5)]}}},
        "measured_in": {"mnist": {"dcgan": older}},  # vae: not recorded, so the published run's own
        "families": {"dcgan": {"width": 64}, "vae": {"width": 64}},
        "exports": {"mnist": {"count": 5000}},
        "prepared": {"mnist": {"accepted": 5000}},
    }
    results = {"mnist": {"sngan": {600.0: [_run(33.3)]}}}
    origins: dict = {}

    notes = bd.carry_over(previous, results, {}, {}, {}, tmp_path, (600.0,), origins)

    assert origins == {"mnist": {"dcgan": older, "vae": {"date": previous["date"], "commit": "e0e51ca40a6b"}}}
    assert len(notes) == 2, notes
    assert "2026-12-06T16:15:39" in notes[0] and "`d135fa55cd98`" in notes[0] and "mnist `dcgan`" in notes[0]
    assert "mnist `vae`" not in notes[0]
    assert "2026-12-07T15:24:03" in notes[1] and "`e0e51ca40a6b`" in notes[1] and "mnist `vae`" in notes[1]


@pytest.mark.parametrize("budgets", [(300.0, 600.0), (1200.0,)])
def test_figures_at_budgets_the_run_does_not_show_are_not_carried(tmp_path: Path, budgets) -> None:
    previous = {"raw": {"mnist": {"dcgan": {"600": [_run(58.4)]}}}, "families": {"dcgan": {"width": 64}}}
    results: dict = {}
    assert bd.carry_over(previous, results, {}, {}, {}, tmp_path, budgets) == []
    assert results == {}


def test_a_selection_is_refused_where_the_published_zoo_was_measured_on_another_cpu() -> None:
    previous = {"machine": {"cpu_model": "AMD EPYC"}}
    bd.require_same_cpu(previous, "AMD EPYC")  # same CPU: carrying rows over is fair
    with pytest.raises(bd.BenchError, match=r"on 'AMD EPYC', this machine is 'Intel\(R\) Xeon.*BENCH_DATASETS"):
        bd.require_same_cpu(previous, "Intel(R) Xeon(R) Processor")
    with pytest.raises(bd.BenchError, match=r"measured on None"):  # a document that does not say
        bd.require_same_cpu({}, "AMD EPYC")
