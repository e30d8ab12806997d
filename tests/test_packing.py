"""Packed training (offrl.fast.packing, offrl.packed): every member of a pack computes what its solo run
computes, resumes bitwise, and stops alone when it diverges."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from offrl import cli
from offrl.algos.base import Algorithm
from offrl.errors import ConfigError
from offrl.fast.packing import SWEEPABLE, PackedStep, sweepable
from offrl.packed import fit_packed, parse_seeds, parse_sweep, plan_members, resume_packed
from offrl.types import Batch
from tests.test_contract import CASES, make, make_data

OFFLINE_CASES = [c for c in CASES if not c.values[0].online]  # type: ignore[union-attr]
MEMBERS = 3
STEPS = 3


def stack(batches: list[Batch]) -> Batch:
    def field(name: str) -> torch.Tensor | None:
        values = [getattr(b, name) for b in batches]
        return None if values[0] is None else torch.stack(values)

    return Batch(**{f.name: field(f.name) for f in dataclasses.fields(Batch)})


def solo_updates(algo: Algorithm, batches: list[Batch]) -> list[dict[str, torch.Tensor]]:
    return [algo.update(b) for b in batches]


def assert_member_equals_solo(pack: PackedStep, k: int, solo: Algorithm, where: str) -> None:
    member = pack.algos[k]
    for name, p in solo.nets.named_parameters():
        torch.testing.assert_close(
            dict(member.nets.named_parameters())[name], p, rtol=1e-4, atol=1e-5, msg=f"{where}: {name}"
        )
    assert member.num_updates == solo.num_updates


@pytest.mark.parametrize("cls,overrides", OFFLINE_CASES)
def test_each_member_updates_as_its_solo_run(cls: type[Algorithm], overrides: dict[str, Any]) -> None:
    """Members with seeds 0..2 on their own batches: weights, optimiser moments and metrics after a few
    updates equal three solo runs' (float tolerance: batched products round differently)."""
    members = [make(cls, overrides, seed=s, clip=True) for s in range(MEMBERS)]
    solos = [make(cls, overrides, seed=s, clip=True) for s in range(MEMBERS)]
    data = [make_data(cls, STEPS, seed=100 + s) for s in range(MEMBERS)]
    pack = PackedStep(members)
    packed_metrics = [pack.update(stack([data[k][i] for k in range(MEMBERS)])) for i in range(STEPS)]
    pack.unpack()
    for k, solo in enumerate(solos):
        metrics = solo_updates(solo, data[k])
        assert_member_equals_solo(pack, k, solo, f"member {k}")
        for i in range(STEPS):
            for key, value in metrics[i].items():
                torch.testing.assert_close(packed_metrics[i][key][k], value, rtol=1e-4, atol=1e-5, msg=key)
        for name, opt in solo.optimizers.items():
            member_opt = pack.algos[k].optimizers[name]
            for p_solo, p_member in zip(
                opt.param_groups[0]["params"], member_opt.param_groups[0]["params"], strict=True
            ):
                s_state, m_state = opt.state[p_solo], member_opt.state[p_member]
                torch.testing.assert_close(m_state["exp_avg"], s_state["exp_avg"], rtol=1e-4, atol=1e-6)
                assert int(m_state["step"]) == int(s_state["step"])


def _sweep_cases() -> list[Any]:
    cases = []
    for c in OFFLINE_CASES:
        cls, overrides = c.values
        if overrides:  # the default config of each variant
            continue
        for field in sorted(sweepable(cls)):
            cases.append(pytest.param(cls, field, id=f"{c.id}-{field}"))
    return cases


# settings whose effect needs another setting on, or a larger change to show within a few updates
CONTEXT: dict[str, dict[str, Any]] = {
    "target_action_gap": {"lagrange": True},
    "alpha_prime_lr": {"lagrange": True},
}
OTHER_VALUE: dict[str, float] = {"threshold": 0.99}


@pytest.mark.parametrize("cls,field", _sweep_cases())
def test_a_swept_setting_gives_each_member_its_value(cls: type[Algorithm], field: str) -> None:
    value = getattr(cls.Config(), field)
    # None (an algorithm's own default learning rate) gets a rate no variant defaults to
    other = OTHER_VALUE.get(field, 5e-4 if value is None else value * 0.8 if value else 1e-3)
    values = [value, other]
    settings = [{**CONTEXT.get(field, {}), field: v} for v in values]
    members = [make(cls, s, seed=1) for s in settings]
    solos = [make(cls, s, seed=1) for s in settings]
    data = make_data(cls, STEPS)
    pack = PackedStep(members)
    assert field in pack.sweep
    for b in data:
        pack.update(stack([b, b]))
    pack.unpack()
    for k, solo in enumerate(solos):
        solo_updates(solo, data)
        assert_member_equals_solo(pack, k, solo, f"{field}={values[k]}")
    # the setting matters: the two members end apart
    a, b = (dict(m.nets.named_parameters()) for m in pack.algos)
    assert any(not torch.equal(a[n], b[n]) for n in a), f"{field} changed nothing in {STEPS} updates"


def test_every_sweepable_setting_exists() -> None:
    from offrl.algos.registry import variants

    keys = set()
    for name, variant, cls in variants(online=False):
        key = f"{name}/discrete" if variant == "discrete" else name
        allowed = SWEEPABLE.get(key, frozenset())
        keys.add(key)
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        assert allowed <= fields, f"{key}: {sorted(allowed - fields)} are not settings"
    assert set(SWEEPABLE) <= keys


def test_members_may_not_differ_in_architecture() -> None:
    from offrl.algos.bc import BC

    with pytest.raises(ConfigError, match=r"may differ only in seed and in .*; they differ in policy"):
        PackedStep([make(BC, {}), make(BC, {"policy": "gaussian"})])


@pytest.mark.parametrize(
    "text,seeds", [("0-3", [0, 1, 2, 3]), ("5", [5]), ("0,3,5", [0, 3, 5]), ("0-2,8,1", [0, 1, 2, 8])]
)
def test_parse_seeds(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-x", "-2"])
def test_parse_seeds_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds(text)


def test_plan_members_names_folders() -> None:
    members = plan_members([0, 1], parse_sweep(["cql_alpha=1,5"]))
    assert [m.folder for m in members] == [
        "cql_alpha=1-seed-0",
        "cql_alpha=1-seed-1",
        "cql_alpha=5-seed-0",
        "cql_alpha=5-seed-1",
    ]
    assert [m.folder for m in plan_members([2], {})] == ["seed-2"]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sweep(["cql_alpha"])


# -- whole runs --------------------------------------------------------------------------------------
SMALL_RUN = {"hidden": "[32, 32]", "batch_size": 64, "train.eval_every": 0, "train.diagnostics": False}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    folder = run_dir / "checkpoints" / latest["checkpoint"] if "checkpoint" in latest else None
    if folder is None:
        folder = sorted((run_dir / "checkpoints").glob("pass_*"))[-1]
    return load_file(str(folder / "state.safetensors"))


def test_a_packed_run_resumes_bitwise(builtin_dataset: Any, tmp_path: Path) -> None:
    data = builtin_dataset("builtin/cartpole-mixed")
    whole = fit_packed(
        "bc", data, tmp_path / "whole", seeds=[0, 1], epochs=2, show_progress=False, **SMALL_RUN
    )
    assert [r.passes for r in whole.results] == [2, 2]  # type: ignore[union-attr]
    fit_packed("bc", data, tmp_path / "split", seeds=[0, 1], epochs=1, show_progress=False, **SMALL_RUN)
    resume_packed(tmp_path / "split", epochs=2, show_progress=False)
    for member in ("seed-0", "seed-1"):
        a, b = _weights(tmp_path / "whole" / member), _weights(tmp_path / "split" / member)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{member}: {k}"


def test_members_are_solo_runs(builtin_dataset: Any, tmp_path: Path) -> None:
    """A member's folder is an ordinary run: its numbers follow its solo run's, and it resumes alone."""
    from offrl.logger import read_jsonl
    from offrl.train import fit, resume

    data = builtin_dataset("builtin/cartpole-mixed")
    fit_packed("bc", data, tmp_path / "pack", seeds=[0, 3], epochs=1, show_progress=False, **SMALL_RUN)
    fit("bc", data, tmp_path / "solo", seed=3, epochs=1, show_progress=False, **SMALL_RUN)
    packed = [r for r in read_jsonl(tmp_path / "pack" / "seed-3" / "metrics.jsonl") if "train/loss" in r]
    solo = [r for r in read_jsonl(tmp_path / "solo" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in packed] == [r["step"] for r in solo]
    assert packed[-1]["train/loss"] == pytest.approx(solo[-1]["train/loss"], rel=1e-4)
    status = json.loads((tmp_path / "pack" / "seed-3" / "run.json").read_text())
    assert status["status"] == "finished" and status["pack_member"] == "seed-3"
    result = resume(tmp_path / "pack" / "seed-3", epochs=2, show_progress=False)
    assert result.passes == 2


def test_a_diverged_member_stops_alone(builtin_dataset: Any, tmp_path: Path, capsys: Any) -> None:
    """A learning rate of 1e12 makes TD3+BC's critic overflow; its member is recorded as diverged, the
    other member finishes, and the command exits non-zero naming the diverged one."""
    out = tmp_path / "pack"
    data = builtin_dataset("builtin/pendulum-mixed")
    args = ["train", "--algo", "td3bc", "--dataset", str(data), "--out", str(out), "--epochs", "2"]
    args += [
        "--seeds",
        "0",
        "--sweep",
        "critic_lr=3e-4,1e12",
        "--set",
        "actor_hidden=[32,32]",
        "--set",
        "critic_hidden=[32,32]",
        "--set",
        "train.eval_every=0",
    ]
    assert cli.main(args) != 0
    err = capsys.readouterr().err
    assert "1 of 2 members diverged: critic_lr=1e12-seed-0" in err
    ok = json.loads((out / "critic_lr=3e-4-seed-0" / "run.json").read_text())
    bad = json.loads((out / "critic_lr=1e12-seed-0" / "run.json").read_text())
    assert ok["status"] == "finished" and bad["status"] == "diverged"
    assert "non-finite" in bad["error"]


def test_cli_trains_and_resumes_a_pack(builtin_dataset: Any, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "pack"
    data = builtin_dataset("builtin/cartpole-mixed")
    base = ["train", "--algo", "bc", "--dataset", str(data), "--out", str(out), "--seeds", "0-1"]
    sets = ["--set", "hidden=[32,32]", "--set", "train.eval_every=0"]
    assert cli.main([*base, "--epochs", "1", *sets]) == 0
    assert "pack finished: 2 members" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["pack.json", "seed-0", "seed-1"]
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert "seed-1: 2 passes" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(out), "--seeds", "0-3"]) != 0
    assert "--seeds and --sweep cannot change" in capsys.readouterr().err


@pytest.mark.slow
def test_packed_cql_learns_as_solo_runs_do(builtin_dataset: Any, tmp_path: Path) -> None:
    """Three CQL seeds packed against the same three seeds solo on mixed Pendulum (the learning test's
    setting): float rounding makes the runs drift apart over 3k updates, so the check is statistical:
    the packed mean lies within three standard errors (plus 5 points) of the solo mean, and both learned."""
    import statistics

    from tests.learning import scores

    data = builtin_dataset("builtin/pendulum-mixed")
    nets = {"actor_hidden": (64, 64), "critic_hidden": (64, 64)}
    solo = scores("cql", data, tmp_path / "solo", epochs=40, **nets)
    pack = fit_packed(
        "cql",
        data,
        tmp_path / "pack",
        seeds=[0, 1, 2],
        epochs=40,
        show_progress=False,
        **{"train.eval_every": 40, "train.eval_episodes": 10, "train.threads": 1, **nets},
    )
    packed = [float(r.final_eval["normalized_mean"]) for r in pack.results]  # type: ignore[union-attr,index]
    se = (statistics.variance(solo) / 3 + statistics.variance(packed) / 3) ** 0.5
    print(
        f"packed {[round(x, 1) for x in packed]}, solo {[round(x, 1) for x in solo]}, standard error {se:.1f}"
    )
    assert abs(statistics.mean(packed) - statistics.mean(solo)) <= 3 * se + 5, (packed, solo)
    assert min(statistics.median(packed), statistics.median(solo)) >= 60, (packed, solo)


def test_bench_packs_cells_that_differ_only_in_seed(builtin_dataset: Any, tmp_path: Path) -> None:
    """``offrl bench --pack 3``: the three seeds of a cell train as one pack; each keeps its run folder and
    finished record, the same numbers as the unpacked grid to float tolerance, and the report reads them."""
    from offrl.bench.runner import run_grid

    data = builtin_dataset("builtin/cartpole-mixed")
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'name = "packed"\nseeds = [0, 1, 2]\ndatasets = ["{data}"]\n[budget]\nepochs = 1\n'
        "[train]\neval_every = 1\neval_episodes = 2\nthreads = 1\n[algos.bc]\nhidden = [32, 32]\n"
    )
    finals = {}
    for pack in (3, 1):
        out = tmp_path / f"pack{pack}"
        summary = run_grid(grid, out, pack=pack, workers=1, show_progress=False)
        assert not summary.failed
        records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
        assert len(records) == 3 and all(r["status"] == "finished" for r in records.values())
        assert all(r.get("packed_with") == (3 if pack == 3 else None) for r in records.values())
        finals[pack] = {k: r["final"]["return_mean"] for k, r in records.items()}
    assert finals[3] == pytest.approx(finals[1], rel=1e-3)
    assert cli.main(["report", str(tmp_path / "pack3"), "--out", str(tmp_path / "report")]) == 0
