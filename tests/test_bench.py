"""Benchmark grids: statistics with known answers, grid expansion, and a tiny grid run end to end
through the process pool (resume, retry-then-fail, online cells) into a report with plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from offrl import cli
from offrl.bench import runner
from offrl.bench.grid import expand, load_grid, parse_grid
from offrl.bench.report import BEST_LABEL, write_report
from offrl.bench.stats import (
    iqm,
    mean_std,
    stratified_bootstrap_ci,
    stratified_resamples,
    task_weights,
    trimmed_mean,
    weighted_iqm,
)
from offrl.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- statistics --------------------------------------------------------------------------------------
def test_iqm_by_hand() -> None:
    assert iqm([8, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx((3 + 4 + 5 + 6) / 4)  # n = 8: drop 2 each end
    # n = 6: 1.5 observations trimmed per end; x(2) and x(5) keep half their weight
    assert iqm([16, 0, 8, 1, 4, 2]) == pytest.approx((0.5 * 1 + 2 + 4 + 0.5 * 8) / 3)
    # n = 5: 1.25 trimmed per end; x(2) and x(4) keep 3/4
    assert iqm([50, 1, 2, 3, 4]) == pytest.approx((0.75 * 2 + 3 + 0.75 * 4) / 2.5)
    assert iqm([7.0]) == 7.0
    # weights: the equal-weighted mixture of two tasks with 2 and 4 runs
    w = task_weights([[0.0, 0.0], [10.0] * 4])
    assert w == pytest.approx([0.25, 0.25, 0.125, 0.125, 0.125, 0.125])
    assert weighted_iqm(np.array([0.0, 0.0, 10, 10, 10, 10]), w) == pytest.approx(5.0)
    assert trimmed_mean([1, 2, 3, 100], trim=0.0) == pytest.approx(26.5)


def test_mean_std_is_sample_std() -> None:
    s = mean_std([1.0, 2.0, 6.0])
    assert (s.mean, s.n) == (3.0, 3)
    assert s.std == pytest.approx(np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert "n=1" in mean_std([4.0]).format()


def test_ci_collapses_for_zero_variance_and_is_reproducible() -> None:
    for stat in ("iqm", "mean"):
        iv = stratified_bootstrap_ci([[0.3] * 3, [0.3] * 5], stat, n_boot=500, seed=1)
        assert (
            iv.point == pytest.approx(0.3) and iv.low == pytest.approx(0.3) and iv.high == pytest.approx(0.3)
        )
    data = [[1.0, 5.0, 2.0, 8.0], [10.0, 12.0, 9.0]]
    a = stratified_bootstrap_ci(data, "iqm", n_boot=500, seed=3)
    assert a == stratified_bootstrap_ci(data, "iqm", n_boot=500, seed=3)
    assert a != stratified_bootstrap_ci(data, "iqm", n_boot=500, seed=4)
    assert a.low < a.point < a.high


def test_stratified_resampling_never_mixes_tasks() -> None:
    low, high = np.array([0.0, 0.4, 1.0]), np.array([100.0, 100.2, 100.5, 100.9, 101.0])
    parts = stratified_resamples([low, high], 300, np.random.default_rng(0))
    assert parts[0].shape == (300, 3) and parts[1].shape == (300, 5)
    assert np.isin(parts[0], low).all() and np.isin(parts[1], high).all()
    # pooled resampling would move the mean of task means outside [50, 51] whenever the task mix shifts
    means = stratified_bootstrap_ci([low, high], "mean", n_boot=2000, seed=0)
    assert 50.0 <= means.low <= means.high <= 51.0


def test_bootstrap_coverage_near_nominal() -> None:
    rng = np.random.default_rng(123)
    centres, n_runs, reps = np.array([0.0, 2.0, 5.0]), 10, 200
    # true IQM of the equal mixture of the three task distributions, from a large sample
    big = rng.normal(np.repeat(centres, 200_000), 1.0)
    true = {"mean": centres.mean(), "iqm": float(trimmed_mean(big))}
    covered = {"mean": 0, "iqm": 0}
    for r in range(reps):
        tasks = [rng.normal(c, 1.0, size=n_runs) for c in centres]
        for stat in covered:
            iv = stratified_bootstrap_ci(tasks, stat, n_boot=500, seed=r)
            covered[stat] += iv.low <= true[stat] <= iv.high
    for stat, hits in covered.items():
        assert 0.85 <= hits / reps <= 0.99, (stat, hits / reps)


# -- grid ----------------------------------------------------------------------------------------------
def _record_dataset(path: Path) -> Path:
    from offrl.data.recorder import record
    from offrl.policies import RandomPolicy

    space = gym.make("CartPole-v1").action_space
    return record(
        "CartPole-v1",
        RandomPolicy(space, seed=0),
        episodes=15,
        seed=0,
        out=path,
        progress=False,
        ref_min_return=22.0,
        ref_max_return=500.0,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record_dataset(tmp_path_factory.mktemp("bench-data") / "cartpole-random.h5")


GRID = """
name = "tiny"
seeds = [0, 1]
datasets = [{{ path = "{data}", name = "cp" }}]

[budget]
epochs = 2

[train]
eval_episodes = 2
eval_envs = 1

[algos.bc]
hidden = [16, 16]
batch_size = 64

[algos.cql]
batch_size = 64
[algos.cql.discrete]
hidden = [16, 16]
[algos.cql.continuous]
actor_hidden = [16, 16]

[algos.bad]            # a runtime failure: Adam refuses a negative learning rate
algo = "bc"
hidden = [16, 16]
lr = -1.0
epochs = 1

[[online]]
algo = "dqn"
env = "CartPole-v1"
steps = 200
settings = {{ learning_starts = 50, train = {{ eval_every = 100, eval_episodes = 2, eval_envs = 1 }} }}
"""


def test_grid_expansion(tmp_path: Path, dataset: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(data=dataset))
    cells = {c.cell_id: c for c in expand(load_grid(path))}
    assert sorted(cells) == sorted(
        [f"{a}__cp__s{s}" for a in ("bc", "cql", "bad") for s in (0, 1)]
        + ["online-dqn__CartPole-v1__s0", "online-dqn__CartPole-v1__s1"]
    )
    cql = cells["cql__cp__s1"]
    assert cql.settings == {
        "train.eval_episodes": 2,
        "train.eval_envs": 1,
        "train.threads": 1,
        "train.epochs": 2,
        "batch_size": 64,
        "hidden": [16, 16],  # the discrete variant's settings only
    }
    assert cells["bad__cp__s0"].settings["train.epochs"] == 1 and cells["bad__cp__s0"].algo_name == "bc"
    on = cells["online-dqn__CartPole-v1__s0"]
    assert on.settings["train.steps"] == 200 and on.settings["train.eval_every"] == 100
    assert cql.info["dataset_transitions"] > 0 and cql.env_id == "CartPole-v1"
    assert cells["bc__cp__s0"].config_hash() != cells["bc__cp__s1"].config_hash()

    with pytest.raises(ConfigError, match="unknown key"):
        parse_grid({"seeds": 1, "datasets": ["x.h5"], "algos": {"bc": {}}, "budget": {"epochs": 1}, "sed": 1})
    with pytest.raises(ConfigError, match="epochs or steps"):
        parse_grid({"seeds": 1, "datasets": ["x.h5"], "algos": {"bc": {}}})
    with pytest.raises(ConfigError, match="seeds"):
        parse_grid({"seeds": [], "datasets": ["x.h5"], "algos": {"bc": {}}, "budget": {"epochs": 1}})


def test_grid_only_runs_one_action_type() -> None:
    algos = {
        "cql-slow": {"algo": "cql", "only": "discrete", "lr": 6.25e-5, "sweep": {"cql_alpha": [1.0, 4.0]}},
        "bcq": {"discrete": {"sweep": {"threshold": [0.1]}}},
    }
    grid = parse_grid({"seeds": 1, "datasets": ["x.h5"], "algos": algos, "budget": {"epochs": 1}})
    by_label = {s.label: s for s in grid.algos}
    # `only` names the label without a variant suffix; a variant's own sweep still splits the other label
    assert sorted(by_label) == [
        "bcq-continuous",
        "bcq-threshold=0.1",
        "cql-slow-cql_alpha=1.0",
        "cql-slow-cql_alpha=4.0",
    ]
    slow = by_label["cql-slow-cql_alpha=4.0"]
    assert slow.only == "discrete" and slow.algo == "cql" and slow.settings["lr"] == 6.25e-5
    unused = {"algo": "cql", "only": "discrete", "continuous": {"actor_hidden": [8]}}
    with pytest.raises(ConfigError, match=r"\[algos.x.continuous\] table would never apply"):
        parse_grid({"seeds": 1, "datasets": ["x.h5"], "algos": {"x": unused}, "budget": {"epochs": 1}})
    with pytest.raises(ConfigError, match="only must be one of"):
        parse_grid(
            {"seeds": 1, "datasets": ["x.h5"], "algos": {"bc": {"only": "box"}}, "budget": {"epochs": 1}}
        )


# -- end to end ----------------------------------------------------------------------------------------
def _records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (results / "records").glob("*.json")}


def test_grid_end_to_end_resume_failure_and_report(tmp_path: Path, dataset: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(data=dataset))
    results = tmp_path / "results"

    pool = runner.LocalBackend(2, str(results.resolve()))  # shared by both calls: one start-up of the workers
    try:
        _end_to_end(grid, results, pool, tmp_path)
    finally:
        pool.close(cancel=True)


def _end_to_end(grid: Path, results: Path, pool: runner.LocalBackend, tmp_path: Path) -> None:
    summary = runner.run_grid(grid, results, backend=pool, show_progress=False)
    recs = _records(results)
    offline_ok = [f"{a}__cp__s{s}" for a in ("bc", "cql") for s in (0, 1)]
    for cid in offline_ok:
        r = recs[cid]
        assert r["status"] == "finished" and r["attempts"] == 1 and r["error"] is None
        assert [e["pass"] for e in r["evaluations"]] == [1.0, 2.0]
        assert r["final"]["step"] == r["evaluations"][-1]["step"] == r["steps"]
        assert r["final"]["normalized_score"] is not None and r["threads"] == 1
        assert r["steps_per_second"] > 0 and r["wall_time_s"] > 0 and r["x_unit"] == "gradient_steps"
        # the diag/ metrics of algorithms with a Q-function ride along with each evaluation
        assert all(("q_return_gap" in e) == cid.startswith("cql") for e in r["evaluations"])
    for cid in ("bad__cp__s0", "bad__cp__s1"):  # retried once, then recorded with the error
        assert recs[cid]["status"] == "failed" and recs[cid]["attempts"] == 2
        assert "learning rate" in recs[cid]["error"]
    assert sorted(summary.failed) == ["bad__cp__s0", "bad__cp__s1"]
    on = recs["online-dqn__CartPole-v1__s0"]
    assert on["status"] == "finished" and on["x_unit"] == "env_steps" and on["final"]["step"] == 200

    # resume: only the cells whose records are gone run again; failed cells are not retried by default.
    # cql s1 finished its run before its record was lost: it is trained again from scratch; bc s0 was
    # interrupted (run.json still says running): it continues from its checkpoint.
    before = {p.name: p.read_bytes() for p in (results / "records").glob("*.json")}
    (results / "records" / "cql__cp__s1.json").unlink()
    (results / "records" / "bc__cp__s0.json").unlink()
    run_json = results / "runs" / "bc__cp__s0" / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "status": "running"}))
    again = runner.run_grid(grid, results, backend=pool, show_progress=False)
    assert sorted(again.ran) == ["bc__cp__s0", "cql__cp__s1"]
    after = {p.name: p.read_bytes() for p in (results / "records").glob("*.json")}
    assert {k for k in after if after[k] != before.get(k)} == {"cql__cp__s1.json", "bc__cp__s0.json"}
    for cid, resumed in (("cql__cp__s1", False), ("bc__cp__s0", True)):
        rec, old = json.loads(after[f"{cid}.json"]), json.loads(before[f"{cid}.json"])
        assert rec["status"] == "finished" and rec["resumed"] is resumed
        assert rec["final"] == old["final"] and rec["evaluations"] == old["evaluations"]

    # report through the CLI
    out = tmp_path / "report"
    assert cli.main(["report", str(results), "--out", str(out), "--bootstrap", "200"]) == 0
    text = (out / "report.md").read_text()
    assert "### cp" in text and BEST_LABEL in text and "IQM [95% CI]" in text
    assert "| bad | 0/2 (2 failed) |" in text and "failed after 2 attempt(s)" in text
    pngs = {"curves-cp.png", "diag-cp.png", "aggregate.png", "online-CartPole-v1.png"}
    assert pngs <= {p.name for p in out.iterdir()}
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


@pytest.mark.slow  # starts a local Ray instance: ~10 s or more
def test_ray_backend(tmp_path: Path, dataset: Path) -> None:
    pytest.importorskip("ray")
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'seeds = [0]\ndatasets = ["{dataset}"]\n[budget]\nepochs = 1\n[train]\neval_episodes = 1\n'
        "[algos.bc]\nhidden = [8]\n"
    )
    summary = runner.run_grid(grid, tmp_path / "res", backend="ray", workers=1, show_progress=False)
    assert summary.ran == ["bc__cartpole-random__s0"] and not summary.failed
    rec = _records(tmp_path / "res")["bc__cartpole-random__s0"]
    assert rec["status"] == "finished" and rec["final"] is not None


def test_ray_missing_names_the_extra(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    grid = tmp_path / "grid.toml"
    shutil.copy(dataset, tmp_path / "d.h5")
    grid.write_text('seeds = 1\ndatasets = ["d.h5"]\n[budget]\nepochs = 1\n[algos.bc]\n')
    with pytest.raises(Exception, match=r"offrl\[ray\]"):
        runner.run_grid(grid, tmp_path / "res", backend="ray", show_progress=False)


def _crash_first_attempt(cell_data: dict, results_dir: str, attempt: int) -> dict:
    """A worker target that kills its process on the first attempt of seed 1 and otherwise records a
    result without training (runs in the spawned workers; keeps the test free of torch start-up)."""
    import os

    if cell_data["seed"] == 1 and attempt == 1:
        os._exit(3)
    rec = {"cell_id": cell_data["cell_id"], "status": "finished", "attempts": attempt, "pid": os.getpid()}
    (Path(results_dir) / "records" / f"{cell_data['cell_id']}.json").write_text(json.dumps(rec))
    return rec


def test_dead_worker_is_retried_in_a_new_pool(tmp_path: Path, dataset: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(f'seeds = 4\ndatasets = ["{dataset}"]\n[budget]\nepochs = 1\n[algos.bc]\n')
    results = tmp_path / "res"
    backend = runner.LocalBackend(2, str(results.resolve()), target=_crash_first_attempt)
    try:
        summary = runner.run_grid(grid, results, backend=backend, show_progress=False)
    finally:
        backend.close(cancel=True)
    recs = _records(results)
    assert not summary.failed and all(r["status"] == "finished" for r in recs.values()) and len(recs) == 4
    assert recs["bc__cartpole-random__s1"]["attempts"] == 2
    # a cell that shared the broken pool may have been retried too, but none needed a third attempt
    assert all(r["attempts"] <= 2 for r in recs.values())


def test_report_numbers_from_records(tmp_path: Path) -> None:
    """A report from hand-made records: table cells and aggregates equal the statistics computed
    directly, and a record whose cell has since left the grid is left out."""
    from offrl.bench.grid import Cell

    scores = {("a", "t1"): [10.0, 20.0, 60.0], ("a", "t2"): [50.0, 70.0], ("b", "t1"): [0.0, 5.0, 7.0]}
    cells, records = [], []
    for (algo, task), vals in scores.items():
        for seed, v in enumerate(vals):
            cell = Cell(
                f"{algo}__{task}__s{seed}", "offline", algo, algo, task, seed, "cpu", {"x": 1}, None, "E-v0"
            )
            ev = {"step": 100, "pass": 1.0, "return_mean": v / 10, "return_std": 0.0, "normalized_score": v}
            early = {**ev, "step": 50, "normalized_score": v + 1000}
            cells.append(cell.to_dict())
            records.append(
                {
                    "cell_id": cell.cell_id,
                    "config_hash": cell.config_hash(),
                    "cell": cell.to_dict(),
                    "kind": "offline",
                    "algo": algo,
                    "task": task,
                    "seed": seed,
                    "status": "finished",
                    "evaluations": [early, ev],
                    "final": ev,
                    "best_during_training": early,
                }
            )
    gone = {**records[0], "cell_id": "c__t1__s0", "algo": "c"}  # a cell removed from the grid since
    (tmp_path / "records").mkdir()
    for r in [*records, gone]:
        (tmp_path / "records" / f"{r['cell_id']}.json").write_text(json.dumps(r))
    (tmp_path / "cells.json").write_text(json.dumps({"name": "x", "cells": cells}))

    text = write_report(tmp_path, tmp_path / "rep", n_boot=300, seed=5).read_text()
    assert (
        f"| a | 3/3 | {mean_std([10.0, 20.0, 60.0]).format()} | {mean_std([1.0, 2.0, 6.0]).format()} |"
        in text
    )
    assert f"| {mean_std([1010.0, 1020.0, 1060.0]).format()} |" in text  # the best column
    iqm_a = stratified_bootstrap_ci([scores[("a", "t1")], scores[("a", "t2")]], "iqm", n_boot=300, seed=5)
    mean_a = stratified_bootstrap_ci([scores[("a", "t1")], scores[("a", "t2")]], "mean", n_boot=300, seed=5)
    assert f"| a | 2/2 | 5 | {iqm_a.format()} | {mean_a.format()} |" in text
    assert "| b | 1/2 | 3 |" in text and "Not comparable across all tasks: b" in text
    assert "| c |" not in text and "`c__t1__s0`" in text  # listed as left out, not reported
    # the summary: datasets down the page (as many as the algorithms), n only where fewer seeds finished
    t1a, t1b, t2a = mean_std([10.0, 20.0, 60.0]), mean_std([0.0, 5.0, 7.0]), mean_std([50.0, 70.0])
    assert "| dataset | a | b |" in text
    assert f"| t1 | {t1a.mean:.1f} ± {t1a.std:.1f} | {t1b.mean:.1f} ± {t1b.std:.1f} |" in text
    assert f"| t2 | {t2a.mean:.1f} ± {t2a.std:.1f} (n=2) | – |" in text


def test_report_lists_unrun_cells_by_task(tmp_path: Path) -> None:
    """A partial grid's missing cells read per dataset and algorithm, with their seeds."""
    from offrl.bench.grid import Cell

    cells = [
        Cell(f"{a}__{t}__s{s}", "offline", a, a, t, s, "cpu", {}).to_dict()
        for t in ("t1", "t2")
        for a in ("bc", "cql")
        for s in (0, 1)
    ]
    (tmp_path / "cells.json").write_text(json.dumps({"name": "x", "cells": cells}))
    done = Cell("bc__t1__s0", "offline", "bc", "bc", "t1", 0, "cpu", {})
    ev = {"step": 1, "normalized_score": 1.0, "return_mean": 1.0}
    rec = {
        "cell_id": done.cell_id,
        "config_hash": done.config_hash(),
        "cell": done.to_dict(),
        "kind": "offline",
        "algo": "bc",
        "task": "t1",
        "seed": 0,
        "status": "finished",
        "evaluations": [ev],
        "final": ev,
    }
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "bc__t1__s0.json").write_text(json.dumps(rec))
    text = write_report(tmp_path, tmp_path / "rep", n_boot=50).read_text()
    assert "- not run (yet): 7 of 8 cells" in text
    assert "  - t1: bc (seed 1), cql (seeds 0, 1)" in text
    assert "  - t2: bc (seeds 0, 1), cql (seeds 0, 1)" in text


def test_report_states_the_cost_of_each_column(tmp_path: Path) -> None:
    """The speed section sums each algorithm's wall times into worker-hours, resumed runs counted."""
    (tmp_path / "records").mkdir()
    ev = {"step": 1, "normalized_score": 1.0, "return_mean": 1.0}
    for algo, seed, wall, resumed in (
        ("bc", 0, 1800.0, False),
        ("bc", 1, 900.0, True),
        ("cql", 0, 7200.0, False),
    ):
        rec = {
            "cell_id": f"{algo}__t__s{seed}",
            "kind": "offline",
            "algo": algo,
            "task": "t",
            "seed": seed,
            "status": "finished",
            "evaluations": [ev],
            "final": ev,
            "wall_time_s": wall,
            "steps_per_second": 100.0,
            "resumed": resumed,
        }
        (tmp_path / "records" / f"{rec['cell_id']}.json").write_text(json.dumps(rec))
    text = write_report(tmp_path, tmp_path / "rep", n_boot=50).read_text()
    assert "| bc | 2 | 0.75 | 1 |" in text
    assert "| cql | 1 | 2.00 | 0 |" in text
    assert "| all | 3 | 2.75 | 1 |" in text


_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize(
    "path",
    [*sorted(_EXPERIMENTS.glob("*.toml")), _EXPERIMENTS / "d3rlpy" / "offrl-at-d3rlpy-settings.toml"],
    ids=lambda p: p.name,
)
def test_shipped_grids_parse(path: Path) -> None:
    grid = load_grid(path)
    assert grid.seeds and (grid.datasets or grid.online)


def test_grid_runtime_settings_reach_the_runtime() -> None:
    """Grids written before [runtime] set precision among an algorithm's settings and threads in
    [train]; both spellings, and runtime.KEY, end up in the run's runtime, and the record's thread count
    follows them."""
    from offrl.bench import grid as gridmod
    from offrl.train import resolve_config

    doc = {
        "seeds": 1,
        "datasets": ["x.h5"],
        "budget": {"epochs": 1},
        "train": {"eval_every": 0},
        "algos": {
            "cql": {"continuous": {"precision": "bf16"}},
            "cql2": {"algo": "cql", "runtime": {"threads": 3}},
        },
    }
    g = parse_grid(doc)
    box = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    plain, threaded = (gridmod._offline_settings(g, a, discrete=False) for a in g.algos)
    cfg = resolve_config("cql", "x.h5", action_space=box, overrides=plain)
    assert (cfg.runtime.precision, cfg.runtime.threads) == ("bf16", 1)
    cfg = resolve_config("cql", "x.h5", action_space=box, overrides=threaded)
    assert cfg.runtime.threads == 3 and "train.threads" not in threaded
    cell = gridmod.Cell("c", "offline", "cql2", "cql", "t", 0, "cpu", threaded)
    assert runner.cell_threads(cell) == 3


def test_external_records_stay_beside_the_grid(tmp_path: Path) -> None:
    """Records of another library's runs (experiments/d3rlpy) are not grid cells: the report keeps them,
    while a record whose cell left the grid is still left out."""
    from offrl.bench.grid import Cell
    from offrl.bench.report import ReportData

    cell = Cell(
        cell_id="bc__t__s0",
        kind="offline",
        algo="bc",
        algo_name="bc",
        task="t",
        seed=0,
        device="cpu",
        settings={},
    )
    (tmp_path / "records").mkdir()
    (tmp_path / "cells.json").write_text(json.dumps({"cells": [cell.to_dict()]}))
    final = {"normalized_score": 50.0, "return_mean": 1.0}
    base = {"kind": "offline", "status": "finished", "task": "t", "final": final, "evaluations": [final]}
    records = {
        "bc__t__s0": {**base, "algo": "bc", "config_hash": cell.config_hash()},
        "gone__t__s0": {**base, "algo": "gone", "config_hash": "x"},
        "d3rlpy-bc__t__s0": {**base, "algo": "d3rlpy-bc (2.8.1)", "external": "d3rlpy"},
    }
    for cell_id, r in records.items():
        (tmp_path / "records" / f"{cell_id}.json").write_text(json.dumps({**r, "cell_id": cell_id}))
    data = ReportData.load(tmp_path)
    assert sorted(data.offline["t"]) == ["bc", "d3rlpy-bc (2.8.1)"] and data.stale == ["gone__t__s0"]


def test_report_groups_by_level_and_by_the_grids_report_table(tmp_path: Path) -> None:
    from offrl.bench.report import ReportData, _grouped_table, report_groups, task_level

    assert (
        task_level("pendulum-medium-replay") == "medium-replay"
        and task_level("lunarlander-medium") == "medium"
    )
    assert task_level("my-data") is None
    (tmp_path / "records").mkdir()
    scores = {"a-random": 10.0, "a-medium": 50.0, "b-random": 30.0}
    for task, score in scores.items():
        final = {"normalized_score": score, "return_mean": score}
        rec = {
            "cell_id": f"bc__{task}__s0",
            "kind": "offline",
            "status": "finished",
            "task": task,
            "algo": "bc",
        }
        (tmp_path / "records" / f"bc__{task}__s0.json").write_text(json.dumps({**rec, "final": final}))
    (tmp_path / "grid.toml").write_text(
        '[report]\ngroups = { chosen = ["classic/a-random"] }\nrest = "held-out"\n'
    )
    data = ReportData.load(tmp_path)
    assert report_groups(data) == {
        "level: random": ["a-random", "b-random"],
        "level: medium": ["a-medium"],
        "chosen": ["a-random"],
        "held-out": ["a-medium", "b-random"],
    }
    table = _grouped_table(data, 100, 0)  # one run per task: resampling within tasks cannot vary it
    assert (
        table[-2]
        == "| bc | 20.0 [20.0, 20.0] (2) | 50.0 [50.0, 50.0] (1) | 10.0 [10.0, 10.0] (1) | 40.0 [40.0, 40.0] (2) |"
    )
    with pytest.raises(ConfigError, match=r"\[report\]"):
        parse_grid(
            {
                "seeds": 1,
                "datasets": ["x.h5"],
                "algos": {"bc": {}},
                "budget": {"epochs": 1},
                "report": {"x": 1},
            }
        )


def test_another_librarys_runs_share_their_algorithms_colour_dashed() -> None:
    """In the curves, d3rlpy's CQL is drawn in offrl's CQL colour, dashed, so the pair reads together."""
    from offrl.bench.report import _Group, line_styles

    def group(external: str | None = None) -> _Group:
        return _Group([{"status": "finished", **({"external": external} if external else {})}])

    styles = line_styles(
        {
            "bc": group(),
            "cql": group(),
            "d3rlpy-cql (2.8.1, 30 passes)": group("d3rlpy"),
            "d3rlpy-bcq (2.8.1, 30 passes)": group("d3rlpy"),
        }
    )
    assert styles["bc"]["color"] != styles["cql"]["color"]
    assert styles["d3rlpy-cql (2.8.1, 30 passes)"] == {
        "color": styles["cql"]["color"],
        "linestyle": "--",
        "marker": "s",
    }
    assert styles["cql"]["linestyle"] == "-"
    # an algorithm only the other library ran gets a colour of its own
    assert styles["d3rlpy-bcq (2.8.1, 30 passes)"]["color"] not in {
        styles["bc"]["color"],
        styles["cql"]["color"],
    }


def test_report_plots_are_palette_pngs(tmp_path: Path) -> None:
    """Report plots are 256-colour PNGs, a third the size of true colour, since reports live in git."""
    from PIL import Image

    from offrl.bench.report import _figure, _save

    fig = _figure()
    fig.add_subplot(1, 1, 1).plot([0, 1, 2], [0, 1, 4], label="x")
    _save(fig, tmp_path / "plot.png")
    with Image.open(tmp_path / "plot.png") as image:
        assert image.format == "PNG" and image.mode == "P" and image.size == (704, 440)


def test_a_sweeps_many_labels_get_distinct_lines() -> None:
    """Past matplotlib's 10 colours, a sweep's curves still differ in colour or line style."""
    from offrl.bench.report import _Group, line_styles

    finished = _Group([{"status": "finished"}])
    order = [f"cql-alpha={i}" for i in range(25)]
    styles = line_styles({a: finished for a in order}, order)
    looks = {(str(st["color"]), st["linestyle"]) for st in styles.values()}
    assert len(looks) == 25 and all(st["linestyle"] != "--" for st in styles.values())


def test_an_algorithm_keeps_its_colour_on_tasks_that_lack_another() -> None:
    from offrl.bench.report import _Group, line_styles

    finished = _Group([{"status": "finished"}])
    order = ["bc", "cql", "iql"]
    everything = line_styles({"bc": finished, "cql": finished, "iql": finished}, order)
    without_cql = line_styles({"bc": finished, "iql": finished}, order)
    assert without_cql["iql"]["color"] == everything["iql"]["color"]
