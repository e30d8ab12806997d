"""Benchmark grids: a TOML file naming algorithms, datasets, seeds and a budget, expanded into cells.

A cell is one ordinary offrl run (offline: ``offrl.train.fit``; online: the online loop) described
by plain data, so it can be sent to a worker process or a Ray task. The format is in docs/bench.md:

    name = "classic-small"
    seeds = [0, 1, 2]                     # or a count: seeds = 3 → 0, 1, 2
    datasets = ["builtin/pendulum-mixed", "data/my.h5", { path = "x.h5", name = "x" }]

    [budget]                              # length of every offline run: epochs or steps
    epochs = 20

    [train]                               # trainer settings of every offline run (train.KEY)
    eval_every = 5

    [algos.cql]                           # a label; `algo = "cql"` is implied by the label
    cql_alpha = 5.0
    [algos.cql.continuous]                # only for datasets with continuous actions
    actor_hidden = [64, 64]

    [algos.cql-slow]                      # `only`: this label runs on one action type's datasets
    algo = "cql"
    only = "discrete"
    lr = 6.25e-5

    [[online]]                            # optional online runs: algorithm, environment, steps
    algo = "sac"
    env = "Pendulum-v1"
    steps = 20_000
    settings = { learning_starts = 1000 }
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from offrl import config as cfgmod
from offrl.errors import ConfigError

CellKind = Literal["offline", "online", "finetune"]

_TOP_KEYS = {
    "name",
    "seeds",
    "datasets",
    "budget",
    "train",
    "algos",
    "online",
    "finetune",
    "device",
    "workers",
    "ray",
    "preset",
    "report",  # read by `offrl report` from RESULTS/grid.toml: [report] groups and rest
}
_VARIANTS = ("continuous", "discrete")
_BUDGET_KEYS = ("epochs", "steps")


@dataclass(frozen=True)
class DatasetSpec:
    label: str  # short name used in cell ids and tables
    source: str  # as written in the grid: a path or a named dataset


@dataclass(frozen=True)
class AlgoSpec:
    label: str
    algo: str  # registry name
    settings: dict[str, Any]  # plain and train.-prefixed settings for every variant
    variant_settings: dict[str, dict[str, Any]]  # "continuous" | "discrete" -> extra settings
    only: str | None = None  # "continuous" | "discrete": a sweep of one variant's settings
    swept: dict[str, Any] = field(default_factory=dict)  # this spec's values of the swept settings


@dataclass(frozen=True)
class OnlineSpec:
    label: str
    algo: str
    env: str
    steps: int
    settings: dict[str, Any]
    method: str | None = None  # the row it joins in the fine-tuning table, across environments


@dataclass(frozen=True)
class FinetuneSpec:
    """Pretrain ``algo`` on ``dataset`` offline, then fine-tune it online for ``steps`` (one cell per seed)."""

    label: str
    algo: str
    dataset: str
    steps: int
    pretrain: dict[str, Any]  # the offline run's settings, its budget (train.epochs | train.steps) included
    settings: dict[str, Any]  # fine-tuning settings (FineTuneConfig fields, train.… of the online loop)
    method: str | None = None  # the row it joins in the fine-tuning table, across environments


@dataclass(frozen=True)
class GridConfig:
    name: str
    path: Path | None
    seeds: tuple[int, ...]
    datasets: tuple[DatasetSpec, ...]
    algos: tuple[AlgoSpec, ...]
    online: tuple[OnlineSpec, ...] = ()
    finetune: tuple[FinetuneSpec, ...] = ()
    budget: dict[str, int] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    workers: int | None = None
    ray_address: str | None = None


@dataclass(frozen=True)
class Cell:
    """One run of the grid as plain data: what a worker needs to train it and what its record repeats."""

    cell_id: str
    kind: CellKind
    algo: str  # label (table row)
    algo_name: str  # registry name
    task: str  # dataset label (offline) or environment id (online): the table a result belongs to
    seed: int
    device: str
    settings: dict[str, Any]  # passed to fit / the online loop as keyword settings
    dataset: str | None = None  # resolved dataset file (offline)
    env_id: str | None = None  # environment of evaluation
    info: dict[str, Any] = field(default_factory=dict)  # dataset facts: transitions, references

    def config_hash(self) -> str:
        """Identity of what the cell trains: two cells with equal hashes produce the same run."""
        ident = {
            "kind": self.kind,
            "algo_name": self.algo_name,
            "seed": self.seed,
            "device": self.device,
            "settings": self.settings,
            "dataset": self.dataset,
            "env_id": self.env_id,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        return cls(**d)


def slug(text: str) -> str:
    """A file-name-safe form of ``text``: runs of other characters become one dash."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-.") or "x"


# -- reading -----------------------------------------------------------------------------------------
def _flatten_settings(table: dict[str, Any], where: str) -> dict[str, Any]:
    """``{"train": {"k": v}}`` (TOML dotted keys or a sub-table) → ``{"train.k": v}``; other nested
    tables are errors."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            if k not in ("train", "algo", "algo_config", "runtime"):
                raise ConfigError(
                    f"{where}: '{k}' is a table; only train.KEY, algo.KEY and runtime.KEY may be nested"
                )
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    raise ConfigError(f"{where}: '{k}.{kk}' is nested too deep")
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


def _budget(table: dict[str, Any], where: str) -> dict[str, int]:
    budget = {k: table.pop(k) for k in _BUDGET_KEYS if k in table}
    if len(budget) > 1:
        raise ConfigError(f"{where}: give either epochs or steps, not both")
    for k, v in budget.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{where}: '{k}' must be a positive integer, got {v!r}")
    return budget


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{where}: 'seeds' as a count must be positive, got {value}")
        return tuple(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: 'seeds' repeats a seed: {value}")
        return tuple(value)
    raise ConfigError(f"{where}: 'seeds' must be a count or a non-empty list of integers, got {value!r}")


def _dataset_specs(value: Any, where: str) -> tuple[DatasetSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: 'datasets' must be a list of paths, names or {{path, name}} tables")
    specs = []
    for item in value:
        if isinstance(item, str):
            source, label = item, None
        elif isinstance(item, dict) and "path" in item and set(item) <= {"path", "name"}:
            source, label = str(item["path"]), item.get("name")
        else:
            raise ConfigError(f"{where}: dataset entry {item!r} is neither a string nor {{path, name}}")
        if label is None:
            # "builtin/pendulum-mixed" -> "pendulum-mixed", "data/run3.h5" -> "run3"
            label = Path(source).stem if source.endswith((".h5", ".hdf5")) else Path(source).name
        specs.append(DatasetSpec(slug(str(label)), source))
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"{where}: datasets share the label(s) {dupes}; name them with {{ path, name }}")
    return tuple(specs)


def _algo_specs(value: Any, where: str, preset: str | None = None) -> tuple[AlgoSpec, ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'algos' must be a table of [algos.LABEL] tables")
    specs = []
    for label, table in value.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [algos.{label}] must be a table")
        table = dict(table)
        algo = str(table.pop("algo", label))
        only_one = table.pop("only", None)
        if only_one is not None and only_one not in _VARIANTS:
            raise ConfigError(
                f"{where}: [algos.{label}] only must be one of {list(_VARIANTS)}, got {only_one!r}"
            )
        sweep = _sweep(table.pop("sweep", {}), f"{where} [algos.{label}] sweep")
        if preset is not None:
            table.setdefault("preset", preset)
        variant_tables = {v: dict(table.pop(v, {})) for v in _VARIANTS}
        other = next((v for v in _VARIANTS if v != only_one and variant_tables[v]), None)
        if only_one is not None and other is not None:
            raise ConfigError(
                f"{where}: [algos.{label}] runs only on {only_one} datasets, so its [algos.{label}.{other}] "
                "table would never apply; remove one of them"
            )
        variant_sweeps = {
            v: _sweep(t.pop("sweep", {}), f"{where} [algos.{label}.{v}] sweep")
            for v, t in variant_tables.items()
        }
        variants = {
            v: _flatten_settings(t, f"{where} [algos.{label}.{v}]") for v, t in variant_tables.items()
        }
        settings = _flatten_settings(table, f"{where} [algos.{label}]")
        # a variant's own sweep splits the algorithm into one spec per variant, each seeing only its datasets
        split = any(len(c) > 1 or c != [{}] for c in variant_sweeps.values())
        if only_one is not None:
            runs_on: tuple[str | None, ...] = (only_one,)
            split = False  # one action type only: the label needs no variant suffix
        else:
            runs_on = _VARIANTS if split else (None,)
        for only in runs_on:
            for combo in sweep:
                for own in variant_sweeps[only] if only else [{}]:
                    swept = {**combo, **own}
                    name = "-".join([label, *(f"{k}={_text(v)}" for k, v in swept.items())])
                    if split and not swept:
                        name = f"{label}-{only}"
                    specs.append(AlgoSpec(slug(name), algo, settings, variants, only, swept))
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"{where}: [algos] labels repeat: {dupes}")
    return tuple(specs)


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _sweep(table: Any, where: str) -> list[dict[str, Any]]:
    """``{key: [v1, v2], …}`` → every combination as settings (one empty combination without a sweep)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table of KEY = [values]")
    combos: list[dict[str, Any]] = [{}]
    for key, values in _flatten_settings(dict(table), where).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {key} must be a non-empty list of values, got {values!r}")
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def _online_specs(value: Any, where: str) -> tuple[OnlineSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: 'online' must be an array of [[online]] tables")
    specs = []
    for i, table in enumerate(value):
        w = f"{where} [[online]] #{i + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"{w}: must be a table")
        unknown = set(table) - {"algo", "env", "steps", "settings", "name", "method"}
        if unknown or not {"algo", "env", "steps"} <= set(table):
            raise ConfigError(
                f"{w}: needs algo, env and steps (optional: settings, name, method); got {sorted(table)}"
            )
        steps = table["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ConfigError(f"{w}: 'steps' must be a positive integer, got {steps!r}")
        settings = _flatten_settings(dict(table.get("settings", {})), w)
        specs.append(
            OnlineSpec(
                slug(str(table.get("name", table["algo"]))),
                str(table["algo"]),
                str(table["env"]),
                steps,
                settings,
                _method(table, w),
            )
        )
    return tuple(specs)


def _method(table: dict[str, Any], where: str) -> str | None:
    method = table.get("method")
    if method is not None and not isinstance(method, str):
        raise ConfigError(f"{where}: 'method' must be a name, got {method!r}")
    return method


def _finetune_specs(value: Any, where: str) -> tuple[FinetuneSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: 'finetune' must be an array of [[finetune]] tables")
    specs = []
    for i, table in enumerate(value):
        w = f"{where} [[finetune]] #{i + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"{w}: must be a table")
        required = {"algo", "dataset", "steps", "pretrain"}
        unknown = set(table) - required - {"settings", "name", "method"}
        if unknown or not required <= set(table):
            raise ConfigError(
                f"{w}: needs algo, dataset, pretrain (a table with epochs or steps) and steps (optional: "
                f"settings, name, method); got {sorted(table)}"
            )
        steps = table["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ConfigError(f"{w}: 'steps' must be a positive integer, got {steps!r}")
        pretrain = dict(table["pretrain"]) if isinstance(table["pretrain"], dict) else None
        if pretrain is None or sum(k in pretrain for k in _BUDGET_KEYS) != 1:
            raise ConfigError(
                f"{w}: 'pretrain' must be a table with epochs or steps (and the algorithm's settings)"
            )
        budget = {f"train.{k}": pretrain.pop(k) for k in _BUDGET_KEYS if k in pretrain}
        label = slug(str(table.get("name", table["algo"])))
        specs.append(
            FinetuneSpec(
                label,
                str(table["algo"]),
                str(table["dataset"]),
                steps,
                {**budget, **_flatten_settings(pretrain, f"{w} pretrain")},
                _flatten_settings(dict(table.get("settings", {})), w),
                _method(table, w),
            )
        )
    return tuple(specs)


def parse_grid(doc: dict[str, Any], path: str | os.PathLike[str] | None = None) -> GridConfig:
    """Validate a grid document (as read from TOML) into a :class:`GridConfig`."""
    where = str(path) if path is not None else "grid"
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    preset = doc.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{where}: 'preset' must be a preset's name, got {preset!r}")
    algos = _algo_specs(doc.get("algos", {}), where, preset)
    online = _online_specs(doc.get("online", []), where)
    finetune = _finetune_specs(doc.get("finetune", []), where)
    datasets = _dataset_specs(doc.get("datasets", []), where)
    if not online and not finetune and not (algos and datasets):
        raise ConfigError(
            f"{where}: name at least one algorithm ([algos.NAME]) and one dataset, or [[online]] runs"
        )
    if algos and not datasets:
        raise ConfigError(f"{where}: [algos] are given but no 'datasets'")
    if "seeds" not in doc:
        raise ConfigError(f"{where}: 'seeds' is required (a count or a list)")
    budget = _budget(dict(doc.get("budget", {})), f"{where} [budget]")
    if set(doc.get("budget", {})) - set(_BUDGET_KEYS):
        raise ConfigError(f"{where} [budget]: only 'epochs' or 'steps'")
    if algos and not budget and any(not ({*_BUDGET_KEYS, "preset"} & set(a.settings)) for a in algos):
        raise ConfigError(f"{where}: give the length of the offline runs: [budget] epochs or steps")
    train = dict(doc.get("train", {}))
    if any(isinstance(v, dict) for v in train.values()):
        raise ConfigError(f"{where} [train]: nested tables are not trainer settings")
    report = doc.get("report", {})
    if not isinstance(report, dict) or set(report) - {"groups", "rest"}:
        raise ConfigError(f"{where} [report]: only 'groups' (name = [dataset labels]) and 'rest' (a name)")
    groups = report.get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
        raise ConfigError(f"{where} [report] groups: a table of NAME = [dataset labels]")
    ray = dict(doc.get("ray", {}))
    if set(ray) - {"address"}:
        raise ConfigError(f"{where} [ray]: only 'address' is known")
    workers = doc.get("workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"{where}: 'workers' must be a positive integer, got {workers!r}")
    name = str(doc.get("name", Path(path).stem if path is not None else "grid"))
    return GridConfig(
        name=name,
        path=Path(path) if path is not None else None,
        seeds=_seeds(doc["seeds"], where),
        datasets=datasets,
        algos=algos,
        online=online,
        finetune=finetune,
        budget=budget,
        train=train,
        device=str(doc.get("device", "cpu")),
        workers=workers,
        ray_address=ray.get("address"),
    )


def load_grid(path: str | os.PathLike[str]) -> GridConfig:
    return parse_grid(cfgmod.read_toml(path), path)


# -- expansion ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetFacts:
    path: str
    env_id: str | None
    discrete: bool
    transitions: int
    ref_min_return: float | None
    ref_max_return: float | None


def _resolve_source(source: str, base: Path | None) -> str:
    """A relative dataset path is read relative to the grid file when it exists there."""
    if base is not None and not Path(source).is_absolute() and (base / source).exists():
        return str((base / source).resolve())
    if Path(source).exists():
        return str(Path(source).resolve())
    from offrl.datasets_registry import resolve_dataset
    from offrl.logger import progress_enabled

    return str(Path(resolve_dataset(source, progress=progress_enabled())).resolve())


def dataset_facts(source: str, base: Path | None = None) -> DatasetFacts:
    """Resolve a dataset (building a named one on first use) and read what cells and reports need."""
    import gymnasium as gym

    from offrl.data.format import read_raw

    path = _resolve_source(source, base)
    raw = read_raw(path)
    return DatasetFacts(
        path=path,
        env_id=raw.env_id,
        discrete=isinstance(raw.action_space, gym.spaces.Discrete),
        transitions=int(raw.num_transitions),
        ref_min_return=raw.ref_min_return,
        ref_max_return=raw.ref_max_return,
    )


def _offline_settings(grid: GridConfig, algo: AlgoSpec, discrete: bool) -> dict[str, Any]:
    """A cell's settings: the preset's (expanded here, so a changed preset changes the cell's hash), the
    grid's [train], its budget, then the algorithm's own."""
    from offrl import presets

    variant = algo.variant_settings["discrete" if discrete else "continuous"]
    specific = {**algo.settings, **variant, **algo.swept}
    preset = specific.pop("preset", None)
    own_budget = {k: specific.pop(k) for k in _BUDGET_KEYS if k in specific}
    if len(own_budget) > 1:
        raise ConfigError(f"[algos.{algo.label}]: give either epochs or steps, not both")
    budget = own_budget or grid.budget
    settings: dict[str, Any] = {}
    if preset is not None:
        settings = presets.preset_settings(str(preset), algo.algo, discrete=discrete)
        if budget:
            settings = presets.without_budget(settings)
    settings.update({f"train.{k}": v for k, v in grid.train.items()})
    for k, v in budget.items():
        settings[f"train.{k}"] = v
    settings.update(specific)
    return _one_thread_by_default(settings)


def _one_thread_by_default(settings: dict[str, Any]) -> dict[str, Any]:
    """One torch thread per run unless the grid sets a thread count: the pool parallelises across runs."""
    from offrl.run import runtime_setting

    if runtime_setting(settings, "threads") is None:
        settings["train.threads"] = 1
    return settings


def _has_variant(name: str, discrete: bool) -> bool:
    from offrl.algos import registry

    try:
        registry.algorithm_class(name, discrete=discrete)
    except ConfigError:
        if name not in registry.names(online=False):  # unknown, or an online algorithm
            raise
        return False
    return True


def _dataset_info(source: str, facts: DatasetFacts) -> dict[str, Any]:
    """What a cell's record repeats about its dataset (the report's tables and axes read it)."""
    return {
        "dataset_source": source,
        "dataset_transitions": facts.transitions,
        "ref_min_return": facts.ref_min_return,
        "ref_max_return": facts.ref_max_return,
        "discrete": facts.discrete,
    }


def expand(grid: GridConfig) -> list[Cell]:
    """Every (algorithm, dataset, seed) and (online run, seed) cell of the grid, datasets resolved."""
    base = grid.path.parent if grid.path is not None else None
    cells: list[Cell] = []
    for ds in grid.datasets:
        facts = dataset_facts(ds.source, base)
        info = _dataset_info(ds.source, facts)
        for algo in grid.algos:
            if not _has_variant(algo.algo, facts.discrete):
                continue  # e.g. td3bc on a discrete dataset: that pair is not part of the grid
            if algo.only is not None and algo.only != ("discrete" if facts.discrete else "continuous"):
                continue  # one variant's sweep
            settings = _offline_settings(grid, algo, facts.discrete)
            for seed in grid.seeds:
                cells.append(
                    Cell(
                        cell_id=f"{algo.label}__{ds.label}__s{seed}",
                        kind="offline",
                        algo=algo.label,
                        algo_name=algo.algo,
                        task=ds.label,
                        seed=seed,
                        device=grid.device,
                        settings=settings,
                        dataset=facts.path,
                        env_id=facts.env_id,
                        info=info,
                    )
                )
    for on in grid.online:
        settings = _one_thread_by_default({**on.settings, "train.steps": on.steps})
        for seed in grid.seeds:
            cells.append(
                Cell(
                    cell_id=f"online-{on.label}__{slug(on.env)}__s{seed}",
                    kind="online",
                    algo=f"{on.label} (online)",
                    algo_name=on.algo,
                    task=on.env,
                    seed=seed,
                    device=grid.device,
                    settings=settings,
                    env_id=on.env,
                    info={"method": on.method} if on.method else {},
                )
            )
    for ft in grid.finetune:
        facts = dataset_facts(ft.dataset, base)
        if not facts.env_id:
            raise ConfigError(
                f"{grid.path or 'grid'}: [[finetune]] {ft.label}: {ft.dataset} names no environment"
            )
        pretrain = _one_thread_by_default({f"train.{k}": v for k, v in grid.train.items()} | ft.pretrain)
        settings = {
            **{f"pretrain.{k}": v for k, v in pretrain.items()},
            **{f"finetune.{k}": v for k, v in ft.settings.items()},
            "finetune.train.steps": ft.steps,
        }
        info = _dataset_info(ft.dataset, facts) | ({"method": ft.method} if ft.method else {})
        for seed in grid.seeds:
            cells.append(
                Cell(
                    cell_id=f"finetune-{ft.label}__{_dataset_specs([ft.dataset], 'finetune')[0].label}__s{seed}",
                    kind="finetune",
                    algo=f"{ft.label} (fine-tuned)",
                    algo_name=ft.algo,
                    task=facts.env_id,
                    seed=seed,
                    device=grid.device,
                    settings=settings,
                    dataset=facts.path,
                    env_id=facts.env_id,
                    info=info,
                )
            )
    ids = [c.cell_id for c in cells]
    dupes = sorted({x for x in ids if ids.count(x) > 1})
    if dupes:
        raise ConfigError(
            f"{grid.path or 'grid'}: cells share ids {dupes[:3]}; give the runs distinct labels"
        )
    return cells
