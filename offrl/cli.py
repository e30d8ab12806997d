"""The ``offrl`` command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from offrl.errors import OfflineRLError

Handler = Callable[[argparse.Namespace], int]


def _cmd_validate(args: argparse.Namespace) -> int:
    from offrl.data.format import validate
    from offrl.datasets_registry import is_dataset_name, resolve_dataset

    problems = validate(resolve_dataset(args.file) if is_dataset_name(args.file) else args.file)
    if problems:
        for line in problems:
            print(line)
        return 1
    print(f"{args.file}: OK (dataset format v1)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from offrl.data.inspect import format_summary, plot_returns, summarize
    from offrl.datasets_registry import is_dataset_name, resolve_dataset

    summary = summarize(resolve_dataset(args.file) if is_dataset_name(args.file) else args.file)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(format_summary(summary))
    if args.plot:
        plot_returns(summary, args.plot)
        if not args.json:
            print(f"return histogram written to {args.plot}")
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    from offrl.data.recorder import record
    from offrl.policies import resolve_policy

    if (args.episodes is None) == (args.steps is None):
        raise OfflineRLError("record: give exactly one of --episodes N or --steps N")
    import numpy as np

    from offrl.data.writer import check_destination
    from offrl.evaluation import check_policy_spaces, env_spaces

    if args.obs_dtype is not None:
        try:
            np.dtype(args.obs_dtype)
        except TypeError:
            raise OfflineRLError(
                f"--obs-dtype {args.obs_dtype!r}: not a numpy dtype (e.g. float32)"
            ) from None
    check_destination(args.out, force=args.force)
    obs_space, act_space = env_spaces(args.env)
    policy = resolve_policy(args.policy, obs_space, act_space, seed=args.seed)
    check_policy_spaces(
        policy, obs_space, act_space, policy_name=args.policy, other=f"the environment {args.env}"
    )
    path = record(
        args.env,
        policy,
        episodes=args.episodes,
        steps=args.steps,
        seed=args.seed,
        out=args.out,
        num_envs=args.num_envs,
        compression=args.compression,
        obs_dtype=args.obs_dtype,
        progress=not args.quiet,
    )
    print(f"wrote {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from offrl.data import convert
    from offrl.data.writer import check_destination

    if (args.from_ is None) == (args.to is None):
        raise OfflineRLError("convert: give exactly one of --from FORMAT (import) or --to FORMAT (export)")
    if args.to == "minari":
        if not args.id:
            raise OfflineRLError(
                "convert --to minari: give --id NAMESPACE/NAME-v0, the new Minari dataset's id"
            )
        from offrl.data.minari_io import export_minari

        print(f"wrote Minari dataset {args.id} in {export_minari(args.src, args.id)}")
        return 0
    if not args.out:
        raise OfflineRLError(
            f"convert: --out FILE is required with --{'from' if args.from_ else 'to'} {args.from_ or args.to}"
        )
    check_destination(args.out, force=args.force)
    if args.from_ == "table":
        from offrl.data.table import import_table

        missing = [
            f
            for f, v in (
                ("--episode", args.episode),
                ("--obs", args.obs),
                ("--action", args.action),
                ("--reward", args.reward),
            )
            if not v
        ]
        if missing:
            raise OfflineRLError(f"convert --from table: {', '.join(missing)} required")
        report = import_table(
            args.src,
            args.out,
            episode=args.episode,
            step=args.step,
            obs=args.obs,
            next_obs=args.next_obs,
            action=args.action,
            reward=args.reward,
            terminal=args.terminal,
            timeout=args.timeout,
            action_low=args.action_low,
            action_high=args.action_high,
            action_n=args.action_n,
            env_id=args.env,
            compression=args.compression,
        )
        print(report.describe())
    elif args.from_ == "minari":
        from offrl.data.minari_io import import_minari

        print(import_minari(args.src, args.out, compression=args.compression).describe())
    elif args.from_ == "d4rl":
        report = convert.import_d4rl(
            args.src,
            args.out,
            env_id=args.env,
            compression=args.compression,
        )
        print(report.describe())
    elif args.to == "d4rl":
        convert.export_d4rl(args.src, args.out)
        print(f"wrote {args.out} (D4RL layout)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from offrl.data.writer import check_destination
    from offrl.policies.artifact import load_policy
    from offrl.policies.export import export_policy, signature

    check_destination(args.out, force=args.force)
    policy = load_policy(args.policy)
    path = export_policy(policy, args.format, args.out, ood=args.with_ood)
    print(f"wrote {path} ({args.format}: {signature(policy, ood=args.with_ood)})")
    return 0


def _refuse_fixed_on_resume(args: argparse.Namespace, source_flag: str, source: str, target: str) -> None:
    """``--resume`` keeps what a run's checkpoints were made with: any flag that would change it is an error."""
    flags = {
        "--algo": args.algo,
        source_flag: getattr(args, source_flag.lstrip("-")),
        "--out": args.out,
        "--seed": args.seed is not None,
        "--device": args.device,
        "--config": args.config,
        "--set": args.set,
        "--preset": getattr(args, "preset", None),
    }
    fixed = [flag for flag, given in flags.items() if given]
    if fixed:
        raise OfflineRLError(
            f"--resume continues {args.resume} with the settings, {source} and seed its checkpoints were made "
            f"with, so {', '.join(fixed)} cannot change; only {target} can"
        )


def _cmd_train(args: argparse.Namespace) -> int:
    from offrl import config as cfgmod
    from offrl import train

    overrides = cfgmod.parse_sets(args.set or [])
    if args.preset is not None:
        overrides["preset"] = args.preset
    if args.epochs is not None:
        overrides["train.epochs"] = str(args.epochs)
    if args.steps is not None:
        overrides["train.steps"] = str(args.steps)
    packed = args.seeds is not None or bool(args.sweep)
    if args.resume:
        _refuse_fixed_on_resume(args, "--dataset", "data", "the pass target (--epochs or --steps)")
        if packed:
            raise OfflineRLError(
                "--resume continues a pack with its own members; --seeds and --sweep cannot change"
            )
        from offrl import packed as packmod

        if packmod.is_pack(args.resume):
            return _report_pack(packmod.resume_packed(args.resume, epochs=args.epochs, steps=args.steps))
        result = train.resume(args.resume, epochs=args.epochs, steps=args.steps)
    elif packed:
        from offrl import packed as packmod

        if not (args.algo and args.dataset and args.out):
            raise OfflineRLError("train: --algo, --dataset and --out are required (or --resume RUN_DIR)")
        if args.seed is not None:
            raise OfflineRLError("train: give --seed for one run or --seeds for a pack, not both")
        pack = packmod.fit_packed(
            args.algo,
            args.dataset,
            args.out,
            seeds=packmod.parse_seeds(args.seeds or "0"),
            sweep=packmod.parse_sweep(args.sweep or []),
            device=args.device or "cpu",
            config_file=args.config,
            overrides=overrides,
        )
        return _report_pack(pack)
    else:
        if not (args.algo and args.dataset and args.out):
            raise OfflineRLError("train: --algo, --dataset and --out are required (or --resume RUN_DIR)")
        from offrl.data.format import read_raw
        from offrl.datasets_registry import resolve_dataset

        dataset = resolve_dataset(args.dataset)
        cfg = train.resolve_config(
            args.algo,
            dataset,
            action_space=read_raw(dataset).action_space,
            seed=0 if args.seed is None else args.seed,
            device=args.device or "cpu",
            config_file=args.config,
            overrides=overrides,
        )
        trainer = train.Trainer(cfg, args.out)
        print(trainer.describe_schedule())
        result = trainer.run()
    print(
        f"run finished: {result.passes} passes, {result.steps} gradient steps, {result.steps_per_second:.0f} steps/s"
    )
    if result.final_eval:
        ev = result.final_eval
        line = (
            f"final evaluation: return {ev['mean']:.1f} ± {ev['std']:.1f} over {len(ev['returns'])} episodes"
        )
        if ev.get("normalized_mean") is not None:
            line += f", normalised score {ev['normalized_mean']:.1f}"
        print(line)
    print(f"policy artefact: {result.run_dir / 'policy'}")
    return 0


def _report_pack(pack: Any) -> int:
    """One line per member of a finished pack; non-zero when a member diverged."""
    print(f"pack finished: {len(pack.members)} members, {pack.steps_per_second:.0f} steps/s each")
    for member, result in zip(pack.members, pack.results, strict=True):
        if isinstance(result, Exception):
            print(f"  {member.folder}: diverged: {result}")
            continue
        ev = result.final_eval or {}
        score = ev.get("normalized_mean")
        shown = (
            f"normalised score {score:.1f}"
            if score is not None
            else f"return {ev.get('mean', float('nan')):.1f}"
        )
        print(
            f"  {member.folder}: {result.passes} passes, {shown}"
            if ev
            else f"  {member.folder}: {result.passes} passes"
        )
    if pack.diverged:
        raise OfflineRLError(
            f"{len(pack.diverged)} of {len(pack.members)} members diverged: "
            + ", ".join(m.folder for m, _ in pack.diverged)
        )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from offrl.evaluation import check_policy_spaces, env_spaces, evaluate
    from offrl.policies.artifact import find_artifact, load_policy, read_policy_json

    folder = find_artifact(Path(args.policy))
    meta = read_policy_json(folder)
    env_id = args.env or meta.get("env_id")
    if not env_id:
        raise OfflineRLError(f"{args.policy}: the policy records no environment; give --env ENV_ID")
    same_env = env_id == meta.get("env_id")
    obs_space, act_space = env_spaces(env_id)
    policy = load_policy(folder, seed=args.seed)
    check_policy_spaces(
        policy, obs_space, act_space, policy_name=args.policy, other=f"the environment {env_id}"
    )
    result = evaluate(
        policy,
        env_id,
        episodes=args.episodes,
        seed=args.seed,
        num_envs=args.num_envs,
        deterministic=not args.stochastic,
        ref_min_return=meta.get("ref_min_return") if same_env else None,
        ref_max_return=meta.get("ref_max_return") if same_env else None,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        line = f"{env_id}: return {result.mean:.2f} ± {result.std:.2f} (min {result.min:.2f}, max {result.max:.2f}) over {len(result.returns)} episodes"
        if result.normalized_mean is not None:
            line += f"; normalised score {result.normalized_mean:.1f}"
        print(line)
        if result.ood_fraction is not None and result.ood_episode_means is not None:
            means = ", ".join(f"{v:.3g}" for v in result.ood_episode_means)
            print(
                f"OOD: {result.ood_fraction:.1%} of visited states above the threshold {result.ood_threshold:.4g}; "
                f"mean score per episode: {means}"
            )
        else:
            print(f"OOD: {policy.ood_summary()}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from offrl.audit.core import audit, parse_drop, policy_rollout, write_clean
    from offrl.audit.model import ModelConfig
    from offrl.datasets_registry import resolve_dataset

    rule = None
    if (args.drop_anomalies is None) != (args.out is None):
        raise OfflineRLError("audit: --drop-anomalies K|THRESHOLD and --out CLEAN.h5 go together")
    if args.drop_anomalies is not None:
        from offrl.data.writer import check_destination

        rule = parse_drop(args.drop_anomalies)
        check_destination(args.out, force=args.force)
    if args.env and not args.policy:
        raise OfflineRLError("audit: --env chooses where --policy RUN_DIR is rolled out; give --policy too")
    if args.steps < 0:
        raise OfflineRLError(f"--steps must be ≥ 0, got {args.steps}")
    if args.episodes < 1:
        raise OfflineRLError(f"--episodes must be ≥ 1, got {args.episodes}")
    if args.policy:
        from offrl.policies.artifact import find_artifact

        find_artifact(Path(args.policy))
    path = resolve_dataset(args.dataset)
    result = audit(path, top=args.top, model_config=ModelConfig(steps=args.steps, seed=args.seed))
    if args.policy:
        policy_rollout(result, args.policy, args.env, episodes=args.episodes, seed=args.seed)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, allow_nan=False, default=str))
    else:
        from offrl.audit.report import format_text

        print(format_text(result))
    if args.report:
        from offrl.audit.report import write_report

        md = write_report(result, args.report)
        print(f"report written to {md}", file=sys.stderr if args.json else sys.stdout)
    if rule is not None:
        record = write_clean(result, rule, args.out, args.drop_anomalies)
        print(
            f"wrote {args.out}: dropped {record['dropped_episodes']} episodes "
            f"({record['dropped_transitions']} transitions), kept {record['kept_episodes']}",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


def _print_settings(cls: type, skip: frozenset[str] = frozenset(), defaults: object | None = None) -> None:
    """One line per setting of a config dataclass; ``defaults``: an instance whose values are the defaults
    where a command's differ from the dataclass's (online runs' one thread)."""
    import dataclasses

    from offrl.config import field_help

    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            if defaults is not None:
                default = getattr(defaults, f.name)
            else:
                default = f.default if f.default is not dataclasses.MISSING else "(required)"
            print(f"  {f.name:<24} {default!s:<18} {helps[f.name]}")


def _cmd_algos(args: argparse.Namespace) -> int:
    from offrl.algos import registry
    from offrl.online.loop import ONLINE_RUNTIME, OnlineTrainConfig
    from offrl.runtime import RUNTIME_KEYS, Runtime
    from offrl.train import TrainConfig

    if args.name is None:
        print(f"{'name':<8} {'variant':<11} {'trained by':<14} description")
        for name, variant, cls in registry.variants():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            command = "offrl online" if cls.online else "offrl train"
            print(f"{name:<8} {variant:<11} {command:<14} {doc}")
        print("\n`offrl algos NAME` lists an algorithm's settings (use them with --set key=value).")
        return 0
    shown = [(v, c) for n, v, c in registry.variants() if n == args.name]
    if not shown:
        raise OfflineRLError(f"unknown algorithm {args.name!r}; available: {', '.join(registry.names())}")
    for variant, cls in shown:
        print(f"{args.name} ({variant}) hyperparameters: {cls.Config.__name__}")
        _print_settings(cls.Config, skip=RUNTIME_KEYS)
        print()
    online = shown[0][1].online
    print("runtime settings (runtime.KEY: how the run computes, recorded in config.toml [runtime]):")
    _print_settings(Runtime, defaults=ONLINE_RUNTIME if online else None)
    print()
    print("trainer settings (train.KEY):")
    _print_settings(OnlineTrainConfig if online else TrainConfig)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from offrl import presets

    if args.name is None:
        for name in presets.names():
            first = presets.describe(name).splitlines()
            print(f"{name:<10} {first[0] if first else ''}")
        print("\n`offrl presets NAME` shows one; `offrl train --preset NAME` uses it.")
        return 0
    presets.describe(args.name)  # an unknown name fails with the list of presets
    print((presets.PRESET_DIR / f"{args.name}.toml").read_text().strip())
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from offrl import builtin, suites

    if args.action == "list":
        print(suites.format_dataset_list())
        return 0
    specs = suites.all_specs()
    if not args.name:
        raise OfflineRLError("datasets build: name a dataset or a suite (see `offrl datasets list`)")
    if args.out is not None:
        from offrl.data.writer import check_destination

        check_destination(args.out, force=args.force)
    if args.name in builtin.RECIPES:
        print(f"wrote {builtin.build(args.name, args.out)}")
        return 0
    names = [n for n in specs if n == args.name or n.startswith(args.name.rstrip("/") + "/")]
    if not names:
        known = ", ".join([*builtin.RECIPES, *sorted({s.suite for s in specs.values()})])
        hint = suites.missing_manifests_hint()
        raise OfflineRLError(
            f"datasets build {args.name}: no such dataset or suite; known: {known}, …"
            + (f"; {hint}" if hint else "")
        )
    if args.out and len(names) > 1:
        raise OfflineRLError(f"datasets build {args.name}: --out takes one dataset, this names {len(names)}")
    failed = 0
    for name in names:
        if args.out is None and builtin.dataset_path(name).exists() and not args.force:
            print(f"{name}: already built at {builtin.dataset_path(name)} (--force rebuilds)")
            continue
        path, record = suites.build(name, args.out)
        print(
            f"{name}: {record['transitions']:,} transitions, {record['episodes']} episodes, mean return "
            f"{record['mean_return']:.1f}, normalised score {record['normalized_score']:.1f} -> {path}"
        )
        problem = suites.mismatch(specs[name], record)
        if problem:
            failed += 1
            print(f"{name}: WARNING {problem}", file=sys.stderr)
    return 1 if failed and args.strict else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from offrl.bench.grid import load_grid
    from offrl.bench.runner import run_grid

    grid = load_grid(args.config)
    out = args.out or str(Path("runs") / "bench" / grid.name)
    summary = run_grid(
        grid,
        out,
        backend=args.backend,
        workers=args.workers,
        ray_address=args.ray_address,
        retry_failed=args.retry_failed,
        pack=args.pack,
    )
    for line in summary.messages:
        print(line)
    print(
        f"{len(summary.cells)} cells: {len(summary.ran)} run now, {len(summary.skipped)} recorded before, "
        f"{len(summary.failed)} failed; records in {summary.results_dir / 'records'}"
    )
    print(f"next: offrl report {out} --out {Path(out) / 'report'}")
    return 1 if summary.failed else 0  # the grid completed, but not every cell has a result


def _cmd_report(args: argparse.Namespace) -> int:
    from offrl.bench.report import write_report

    if args.bootstrap < 1:
        raise OfflineRLError(f"--bootstrap must be ≥ 1 resamples, got {args.bootstrap}")
    path = write_report(args.results_dir, args.out, n_boot=args.bootstrap, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _cmd_online(args: argparse.Namespace) -> int:
    from offrl import config as cfgmod
    from offrl.online import loop

    if args.resume:
        _refuse_fixed_on_resume(args, "--env", "environment", "the step target (--steps)")
        result = loop.resume_online(args.resume, steps=args.steps)
    else:
        if not args.out:
            raise OfflineRLError("online: --out RUN_DIR is required (or --resume RUN_DIR)")
        overrides: dict[str, object] = dict(cfgmod.parse_sets(args.set or []))
        if args.steps is not None:
            overrides["train.steps"] = args.steps
        cfg = loop.resolve_online_config(
            args.algo,
            args.env,
            seed=args.seed,
            device=args.device,
            config_file=args.config,
            overrides=overrides,
        )
        trainer = loop.OnlineTrainer(cfg, args.out)
        print(trainer.describe_schedule())
        result = trainer.run()
    line = f"run finished: {result.env_steps} env steps, {result.updates} updates, {result.steps_per_second:.0f} env steps/s"
    print(line + (" (stopped: evaluation reached stop_return)" if result.stopped_early else ""))
    if result.final_eval:
        ev = result.final_eval
        print(
            f"final evaluation: return {ev['mean']:.1f} ± {ev['std']:.1f} over {len(ev['returns'])} episodes"
        )
    print(f"policy artefact: {result.run_dir / 'policy'}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from offrl import config as cfgmod
    from offrl import finetune as ft

    if args.resume:
        fixed = [
            f
            for f, v in (("RUN_DIR", args.run), ("--env", args.env), ("--out", args.out), ("--set", args.set))
            if v
        ]
        if fixed or args.seed is not None or args.offline_data or args.offline_ratio is not None:
            raise OfflineRLError(
                f"--resume continues {args.resume} with its own source run and settings; only --steps can change"
            )
        result = ft.resume_finetune(args.resume, steps=args.steps)
    else:
        if not (args.run and args.out and args.steps):
            raise OfflineRLError("finetune: RUN_DIR, --steps and --out are required (or --resume DIR)")
        result = ft.finetune(
            args.run,
            args.out,
            env=args.env,
            steps=args.steps,
            seed=0 if args.seed is None else args.seed,
            device=args.device or "cpu",
            offline_data=args.offline_data,
            offline_ratio=args.offline_ratio,
            overrides=dict(cfgmod.parse_sets(args.set or [])),
        )
    info = json.loads((result.run_dir / "run.json").read_text())
    m = info.get("finetune", {})

    def show(key: str) -> str:
        v = m.get(key)
        return "n/a" if v is None else f"{v:.1f}" if key != "regret" else f"{v:.3f}"

    print(f"fine-tuned {result.env_steps} env steps, {result.updates} updates")
    print(
        f"normalised score: {show('score_start')} offline -> {show('score_end')} at the end; dip {show('dip')}, "
        f"area under the curve {show('auc')}, regret {show('regret')}"
    )
    print(f"policy artefact: {result.run_dir / 'policy'}; online transitions: {result.run_dir / 'online.h5'}")
    return 0


def _cmd_iterate(args: argparse.Namespace) -> int:
    from offrl import config as cfgmod
    from offrl.iterate import ITERATE_JSON, IterateConfig, run_iterate

    cfg = IterateConfig(
        env=args.env,
        algo=args.algo,
        dataset=args.dataset,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        seed=args.seed,
        warm_start=args.warm_start,
        epochs=args.epochs,
        steps=args.steps,
        settings=dict(cfgmod.parse_sets(args.set or [])),
        device=args.device,
        config_file=args.config,
    )
    result = run_iterate(cfg, args.out, log=print)
    if result.skipped:
        print(f"{len(result.skipped)} round(s) finished before, skipped")
    print(f"{len(result.rounds)} rounds in {result.out / ITERATE_JSON}")
    print(f"next: offrl report {result.out} --out {result.out / 'report'}")
    return 0


def _cmd_ope(args: argparse.Namespace) -> int:
    import torch

    from offrl.ope.fqe import FQEConfig
    from offrl.ope.run import parse_methods, run_ope

    if args.threads < 1:
        raise OfflineRLError(f"--threads must be ≥ 1, got {args.threads}")
    from offrl.run import run_device

    run_device(args.device)
    torch.set_num_threads(args.threads)
    report = run_ope(
        args.dataset,
        args.policies,
        methods=parse_methods(args.method),
        fqe_config=FQEConfig(gamma=args.gamma, epochs=args.fqe_epochs, seed=args.seed),
        true_episodes=args.true_episodes,
        seed=args.seed,
        device=args.device,
        greedy=args.greedy,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from offrl import __version__
    from offrl.algos import registry

    parser = argparse.ArgumentParser(
        prog="offrl", description="Offline reinforcement learning from logged episodes."
    )
    parser.add_argument("--version", action="version", version=f"offrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("record", help="record episodes of a policy in a gymnasium environment")
    p.add_argument("--env", required=True, help="gymnasium environment id, e.g. CartPole-v1")
    p.add_argument(
        "--policy",
        default="random",
        help="'random', 'scripted:NAME' (a built-in controller) or the path of a policy artefact",
    )
    p.add_argument("--episodes", type=int, help="number of whole episodes to record")
    p.add_argument("--steps", type=int, help="number of transitions; the last episode is cut with a timeout")
    p.add_argument("--seed", type=int, default=0, help="seed of environment resets and of the policy")
    p.add_argument("--num-envs", type=int, default=1, help="parallel sub-environments (gymnasium vector env)")
    p.add_argument("--out", required=True, help="destination HDF5 file (written atomically)")
    p.add_argument("--compression", choices=["lzf", "gzip"], help="compress arrays (transparent to readers)")
    p.add_argument("--obs-dtype", help="down-cast stored observations, e.g. float32 for MuJoCo's float64")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_record)

    p = sub.add_parser("validate", help="check a dataset file against format v1")
    p.add_argument("file")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("info", help="summarise a dataset: episodes, returns, flags, ranges, metadata")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw the episode-return histogram")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="import or export other dataset layouts (D4RL, Minari, tables)")
    p.add_argument("src", help="source file; with --from minari a Minari dataset id or folder")
    p.add_argument(
        "--from",
        dest="from_",
        choices=["d4rl", "minari", "table"],
        help="import SRC from this layout into format v1",
    )
    p.add_argument("--to", choices=["d4rl", "minari"], help="export format-v1 SRC into this layout")
    p.add_argument("--out", help="destination file (not with --to minari, which writes into the Minari root)")
    p.add_argument("--id", help="--to minari: the new dataset's id, NAMESPACE/NAME-v0")
    p.add_argument(
        "--env", help="gymnasium env id to record in the imported file (spaces are then taken from it)"
    )
    p.add_argument("--compression", choices=["lzf", "gzip"])
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    g = p.add_argument_group("--from table (CSV or Parquet, one row per step; needs offrl[table])")
    g.add_argument("--episode", metavar="COL", help="episode id column")
    g.add_argument("--step", metavar="COL", help="step column that orders rows inside an episode")
    g.add_argument(
        "--obs", metavar="COLS", help="observation columns: names or globs, comma-separated ('obs_*')"
    )
    g.add_argument("--next-obs", metavar="COLS", help="next-observation columns (default: the next row's)")
    g.add_argument("--action", metavar="COLS", help="action columns: names or globs ('act_*')")
    g.add_argument("--reward", metavar="COL", help="reward column")
    g.add_argument(
        "--terminal", metavar="COL", help="0/1 column: 1 on an episode's last row if it terminated"
    )
    g.add_argument("--timeout", metavar="COL", help="0/1 column: 1 on an episode's last row if it was cut")
    g.add_argument("--action-low", metavar="X[,X…]", help="continuous actions' lower bounds")
    g.add_argument("--action-high", metavar="X[,X…]", help="continuous actions' upper bounds")
    g.add_argument(
        "--action-n", type=int, metavar="N", help="discrete actions: Discrete(N) (default: max + 1)"
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("train", help="train an offline algorithm in full passes over a dataset")
    p.add_argument(
        "--algo",
        choices=registry.names(online=False),
        metavar="ALGO",
        help=f"offline algorithm ({', '.join(registry.names(online=False))}); the dataset's action space "
        "picks the continuous or discrete variant",
    )
    p.add_argument("--dataset", help="dataset file (format v1) or a named dataset")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--epochs", type=int, help="full passes over the dataset")
    p.add_argument("--steps", type=int, help="gradient steps, rounded up to whole passes")
    p.add_argument("--seed", type=int, help="seed of networks and batch order (default 0)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument(
        "--config",
        help="TOML config file: top-level seed/device, [train], [algo_config] and [runtime] tables",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting; repeatable")
    p.add_argument(
        "--preset",
        metavar="NAME",
        help="start from a named preset's settings (`offrl presets` lists them), below --config and --set",
    )
    p.add_argument(
        "--seeds",
        metavar="SEEDS",
        help="train a pack: one member per seed (e.g. 0-7 or 0,3,5) in one process, into OUT/seed-S "
        "(docs/packing.md)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="pack members for each value of a sweepable setting (e.g. cql_alpha=1,5,10), into "
        "OUT/KEY=VALUE-seed-S; repeatable (every combination); with --seeds, each with every seed",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR (a run, or a pack's OUT) from its last checkpoint",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "evaluate", help="evaluate a trained policy (run directory or artefact) in its environment"
    )
    p.add_argument("policy", metavar="RUN_DIR|POLICY")
    p.add_argument("--env", help="environment id (default: the one the training dataset names)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-envs", type=int, default=1)
    p.add_argument(
        "--stochastic", action="store_true", help="sample actions instead of acting deterministically"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "export", help="write a trained policy as one ONNX or torch.export (.pt2) file, for use without offrl"
    )
    p.add_argument("policy", metavar="RUN_DIR|POLICY_DIR")
    p.add_argument(
        "--format",
        required=True,
        choices=["onnx", "pt2"],
        help="onnx (needs the 'export' extra) or pt2 (torch.export's saved program; torch only)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="destination file (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--with-ood",
        action="store_true",
        help="also output the policy's out-of-distribution score (ood_score, one per observation)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "audit", help="audit a dataset: anomaly scores, extreme values, duplicates, coverage, consistency"
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset file (format v1) or a named dataset")
    p.add_argument("--json", action="store_true", help="print the audit as JSON (rows and episodes by index)")
    p.add_argument("--report", metavar="DIR", help="write DIR/audit.md and one PNG per section")
    p.add_argument("--top", type=int, default=10, help="rows and episodes listed per ranking (default 10)")
    p.add_argument(
        "--drop-anomalies",
        metavar="K|THRESHOLD",
        help="with --out: write a copy without the K highest-scoring episodes (an integer) or those scoring "
        "above THRESHOLD (a number with a point, e.g. 50.0)",
    )
    p.add_argument("--out", metavar="CLEAN.h5", help="the cleaned copy written by --drop-anomalies")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--policy", metavar="RUN_DIR", help="roll this policy out and compare its states with the data"
    )
    p.add_argument("--env", help="environment for --policy (default: the policy's, else the dataset's)")
    p.add_argument("--episodes", type=int, default=10, help="episodes rolled out with --policy")
    p.add_argument("--steps", type=int, default=2000, help="training steps of the anomaly model")
    p.add_argument("--seed", type=int, default=0, help="seed of the anomaly model, the monitor and rollouts")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("algos", help="list algorithms, or one algorithm's settings with their help")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_cmd_algos)

    p = sub.add_parser("presets", help="list the named presets, or show one's settings and how it was chosen")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("datasets", help="list or build the named datasets offrl can make itself")
    p.add_argument("action", choices=["list", "build"])
    p.add_argument(
        "name", nargs="?", help="a dataset (classic/cartpole-medium), a suite (classic) or builtin/…"
    )
    p.add_argument("--out", help="destination file (default: the data directory)")
    p.add_argument(
        "--force", action="store_true", help="rebuild datasets already in the data directory; replace --out"
    )
    p.add_argument(
        "--strict", action="store_true", help="exit 1 if a build's arrays differ from the manifest's SHA-256"
    )
    p.set_defaults(func=_cmd_datasets)

    p = sub.add_parser("bench", help="run a benchmark grid (algorithms × datasets × seeds) into records")
    p.add_argument("config", help="grid TOML file (see docs/bench.md and experiments/)")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="process pool here, or Ray")
    p.add_argument("--workers", type=int, help="cells run at once (default: cores ÷ threads per run)")
    p.add_argument("--out", help="results directory (default: runs/bench/NAME); rerun to continue it")
    p.add_argument("--ray-address", help="Ray cluster address for --backend ray (default: a local instance)")
    p.add_argument("--retry-failed", action="store_true", help="also rerun cells recorded as failed")
    p.add_argument(
        "--pack",
        type=int,
        metavar="K",
        help="train up to K offline cells that differ only in seed (or a sweepable setting) in one process "
        "(fewer where memory is short; default 8 on CUDA, 1 on CPU: one process per cell); docs/packing.md",
    )
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="tables and plots (IQM, bootstrap CIs) from a bench results directory")
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--out", required=True, help="report directory (report.md and PNG plots)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "online", help="train an online RL baseline (sac, dqn, ppo) in a gymnasium environment"
    )
    p.add_argument(
        "--algo",
        choices=registry.names(online=True),
        help="online algorithm (default: the config file's)",
    )
    p.add_argument("--env", help="gymnasium environment id, e.g. CartPole-v1 (default: the config file's)")
    p.add_argument("--steps", type=int, help="environment steps (with --resume: the new total)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--seed", type=int, help="seed of networks, exploration and episodes (default 0)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument(
        "--config", help="TOML config: algo, env, seed, device, [train], [algo_config] and [runtime] tables"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting; repeatable")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    p.set_defaults(func=_cmd_online)

    p = sub.add_parser(
        "finetune",
        help="continue an offline run online: its algorithm's online form, offline data kept in the replay",
    )
    p.add_argument(
        "run", nargs="?", metavar="RUN_DIR", help="the offline run (its folder, with checkpoints/)"
    )
    p.add_argument("--env", help="environment id (default: the one the run's dataset names)")
    p.add_argument(
        "--steps", type=int, help="environment steps of fine-tuning (with --resume: the new total)"
    )
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--seed", type=int, help="seed of exploration, episodes and updates (default 0)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument(
        "--offline-data",
        choices=["keep", "drop"],
        help="keep the offline dataset in the replay (default) or drop it",
    )
    p.add_argument(
        "--offline-ratio",
        type=float,
        help="fraction of each batch from the offline data (default: the algorithm's: 0.5 for CQL and Cal-QL, "
        "uniform over offline and online rows for the others)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting; repeatable")
    p.add_argument(
        "--resume", metavar="DIR", help="continue the fine-tuning run DIR from its last checkpoint"
    )
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("ope", help="estimate policies' returns from a dataset alone (off-policy evaluation)")
    p.add_argument(
        "policies", nargs="+", metavar="POLICY", help="run dir, artefact, 'scripted:NAME' or 'random'"
    )
    p.add_argument("--dataset", required=True, help="dataset file (format v1) or a named dataset")
    p.add_argument(
        "--method",
        action="append",
        help="fqe, is, wis, pdis, dr; repeatable or a comma list (default: all that apply)",
    )
    p.add_argument("--gamma", type=float, default=0.99, help="evaluation discount γ")
    p.add_argument("--fqe-epochs", type=int, help="FQE passes over the dataset (default: about 10,000 steps)")
    p.add_argument(
        "--true-episodes", type=int, default=100, help="env episodes per true value (0: skip the env)"
    )
    p.add_argument(
        "--greedy", action="store_true", help="evaluate each policy's deterministic action (FQE only)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for FQE (small nets: 1 is fastest)"
    )
    p.set_defaults(func=_cmd_ope)

    from offrl.config import field_help
    from offrl.iterate import IterateConfig

    helps = field_help(IterateConfig)
    p = sub.add_parser(
        "iterate", help="K rounds of deploy → append to the dataset → train offline (growing-batch RL)"
    )
    p.add_argument("--env", required=True, help=helps["env"])
    p.add_argument("--algo", required=True, help=helps["algo"])
    p.add_argument("--rounds", type=int, required=True, help=helps["rounds"])
    p.add_argument("--steps-per-round", type=int, required=True, help=helps["steps_per_round"])
    p.add_argument("--dataset", required=True, metavar="FILE", help=helps["dataset"])
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; rerun to continue it")
    p.add_argument("--seed", type=int, default=0, help=helps["seed"])
    p.add_argument("--warm-start", action="store_true", help=helps["warm_start"])
    p.add_argument("--epochs", type=int, help=helps["epochs"])
    p.add_argument("--steps", type=int, help=helps["steps"])
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting; repeatable")
    p.add_argument("--device", default="cpu", help=helps["device"])
    p.add_argument("--config", help=helps["config_file"])
    p.set_defaults(func=_cmd_iterate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except OfflineRLError as exc:
        print(f"offrl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the operating system refused: name the path and the reason, in one line
        where = exc.filename if exc.filename is not None else ""
        reason = exc.strerror or str(exc)
        print(f"offrl {args.command}: error: {where}{': ' if where else ''}{reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM during a run (offrl.run.Interrupted)
        signum = int(getattr(exc, "signum", signal.SIGINT))
        print(f"offrl {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
