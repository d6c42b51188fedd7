"""Tune specs: a base job spec, a search space over its fields, a metric, a scheduler, a search algorithm.

Everything is checked here, before Ray or MLflow start: the tune spec's own fields, the base job
spec, every space dimension at its candidate values (each choice, each bound) and the dimensions
together, the metric, the scheduler's steps against the trials' steps. Errors carry the dotted
path of the field, e.g. ``space.train.lr = 0.0: train.lr: must be > 0.0``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, ValidationError, model_validator

from carousel.config import JobSpec, SpecError, Strict, _format_error, apply_overrides, parse_override, read_yaml, spec_from_dict
from carousel.train.families import VALIDATION_METRICS
from carousel.tune.space import Dimension, Grid, fixed_field, with_values

# What the training loop reports at every validation, per family (train/units.py, ctc_unit.py
# split_metrics); all are lower-is-better. Tune sees these plus best_<ranking metric>.
# The product of candidate values checked together before the search starts; beyond it each
# dimension is still checked alone (and every trial validates its own spec when it starts).
MAX_COMBINATIONS = 4096
MAX_PREFLIGHTS = 64


class SchedulerConfig(Strict):
    kind: Literal["asha", "fifo", "pbt"] = Field(
        "asha", description="asha: stop weak trials early; fifo: run every trial to the end; "
        "pbt: weak trials continue strong trials' state with perturbed settings"
    )
    grace_period: int | None = Field(
        None, ge=1, description="asha: training steps every trial gets before it can be stopped (default: 2 validations)"
    )
    reduction_factor: float = Field(2.0, gt=1, description="asha: 1/reduction_factor of the trials go on at each rung")
    brackets: int = Field(1, ge=1, description="asha: number of brackets (1 = plain successive halving)")
    perturbation_interval: int | None = Field(
        None, ge=1, description="pbt: training steps between exploit/explore decisions, a multiple of "
        "run.checkpoint_every (default: 2 checkpoints)"
    )
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="pbt: the bottom share copies the top share")
    resample_probability: float = Field(0.25, ge=0, le=1, description="pbt: chance a value is resampled, not scaled")
    perturbation_factors: tuple[float, float] = Field((1.2, 0.8), description="pbt: a kept value is scaled by one of these")
    mutate: list[str] | None = Field(
        None, description="pbt: the space's fields it perturbs (default: every one a running trial can take); "
        "the others are copied from the strong trial with its state"
    )


class SearchConfig(Strict):
    kind: Literal["random", "optuna"] = Field(
        "random", description="random (and grid) sampling, or Optuna's TPE (learns from finished trials)"
    )
    seed: int | None = Field(None, description="sampler seed (default: the base spec's seed)")


class TuneSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the search's name (its directory, MLflow parent run)")
    base: str = Field(description="the job spec every trial starts from (relative to this file)")
    set: list[str] = Field(default_factory=list, description="overrides of the base spec: a.b=value")
    space: dict[str, Dimension] = Field(min_length=1, description="dotted job spec field -> dimension")
    metric: str | None = Field(None, description="validation metric to optimize (default: the family's: val_ppl, val_cer)")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(4, ge=1, description="trials (with grid dimensions: samples of each grid point)")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once (default: what the cluster's CPUs/GPUs hold)")
    scheduler: SchedulerConfig = SchedulerConfig()
    search: SearchConfig = SearchConfig()

    @model_validator(mode="after")
    def _combination(self) -> "TuneSpec":
        if self.search.kind == "optuna":
            grids = [p for p, d in self.space.items() if isinstance(d, Grid)]
            if grids:
                raise ValueError(f"search: optuna samples every dimension itself; space.{grids[0]} is a grid (use choice)")
        return self


@dataclass
class Search:
    """A validated search: the tune spec, the base job spec, and what was checked."""

    spec: TuneSpec
    base: JobSpec
    source: str | None = None
    # (values, job spec) at the candidate combinations checked before the start
    candidates: list[tuple[dict[str, Any], JobSpec]] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.base.model.family

    @property
    def metric(self) -> str:
        return self.spec.metric or VALIDATION_METRICS[self.family][0]

    @property
    def max_steps(self) -> int:
        """The longest trial: ASHA's max_t (steps are Tune's time attribute)."""
        return max(s.train.max_steps for s in self.specs())

    @property
    def grace_period(self) -> int:
        sch = self.spec.scheduler
        return sch.grace_period or 2 * max(s.train.eval_every for s in self.specs())

    def specs(self) -> list[JobSpec]:
        return [s for _, s in self.candidates] or [self.base]


def trial_spec(base: dict[str, Any], values: dict[str, Any], run_name: str, storage_path: str,
               init_from: str | None = None) -> JobSpec:
    """The job spec one trial trains: the base with the trial's sampled values, its Train run's
    name (the trial id; for a PBT generation <id>-g<hash>), and for such a generation where it starts."""
    raw = with_values(base, values)
    raw.setdefault("run", {})
    raw["run"] = {**raw["run"], "name": run_name, "storage_path": storage_path}
    if init_from is not None:
        raw["run"]["init_from"] = init_from
    return spec_from_dict(raw, f"trial {run_name}")


def apply_tune_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set`` on a tune spec: ``base.a.b=v`` overrides the base job spec, ``space.a.b={...}``
    replaces one dimension (its key has dots of its own), anything else is a tune spec field."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        if parts[0] == "base" and len(parts) > 1:
            out["set"] = [*(out.get("set") or []), f"{'.'.join(parts[1:])}={item.split('=', 1)[1]}"]
        elif parts[0] == "space" and len(parts) > 1:
            space = out.get("space")
            out["space"] = {**(space if isinstance(space, dict) else {}), ".".join(parts[1:]): value}
        else:
            out = apply_overrides(out, [item])
    return out


def is_tune_spec(raw: dict[str, Any]) -> bool:
    """A tune spec names a base job spec and a space; a job spec has data and train."""
    return isinstance(raw, dict) and "space" in raw and "base" in raw


def _tune_spec(raw: dict[str, Any], source: str | None) -> TuneSpec:
    try:
        return TuneSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError([_format_error(err) for err in e.errors()], source) from None


def _absolute_or_uri(v: Any) -> bool:
    return isinstance(v, str) and ("://" in v or v.startswith("/"))


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_space(spec: TuneSpec, base: JobSpec, source: str | None = None) -> list[tuple[dict[str, Any], JobSpec]]:
    """Build the job spec at every candidate value of every dimension, and at the candidates'
    combinations (up to MAX_COMBINATIONS). Returns the candidate specs; raises SpecError."""
    problems: list[str] = []
    raw = base.model_dump(mode="json")
    ok: dict[str, list[Any]] = {}
    for path, dim in spec.space.items():
        why = fixed_field(path)
        if why:
            problems.append(f"space.{path}: {why}")
            continue
        good = []
        for v in dim.candidates():
            if path.startswith("data.") and path.endswith("path") and not _absolute_or_uri(v):
                problems.append(f"space.{path} = {_value(v)}: use absolute paths or URIs (trials run in their own directories)")
                continue
            try:
                spec_from_dict(with_values(raw, {path: v}))
                good.append(v)
            except (SpecError, ValueError) as e:
                for p in getattr(e, "problems", [str(e)]):
                    problems.append(f"space.{path} = {_value(v)}: {p}")
        ok[path] = good
    if problems:
        raise SpecError(problems, source)

    paths = list(ok)
    combos = list(itertools.islice(itertools.product(*(ok[p] for p in paths)), MAX_COMBINATIONS))
    specs, failed = [], []
    for combo in combos:
        values = dict(zip(paths, combo))
        try:
            specs.append((values, spec_from_dict(with_values(raw, values))))
        except SpecError as e:
            if len(failed) < 5:
                where = ", ".join(f"{p}={_value(v)}" for p, v in values.items())
                failed.append(f"space ({where}): {'; '.join(e.problems)}")
    if failed:
        raise SpecError(failed + ["  (the dimensions' values must work together: narrow them, or fix the base spec)"], source)
    return specs


def check_search(search: Search) -> None:
    """Metric, mode and scheduler against the trials they will run."""
    spec, problems = search.spec, []
    metrics = VALIDATION_METRICS[search.family]
    if search.metric not in metrics:
        problems.append(f"metric: {search.metric!r} is not reported at validation by model.family "
                        f"{search.family} (one of {', '.join(metrics)})")
    elif spec.mode != "min":
        problems.append(f"mode: {search.metric} is lower-is-better; use min")
    sch = spec.scheduler
    if sch.kind == "pbt":
        problems.extend(_pbt_problems(search))
    if sch.kind == "asha":
        shortest = min(s.train.max_steps for s in search.specs())
        every = max(s.train.eval_every for s in search.specs())
        if sch.grace_period is not None and sch.grace_period < every:
            problems.append(f"scheduler.grace_period: {sch.grace_period} steps is less than one validation "
                            f"(train.eval_every {every}): the first decision would come before any metric")
        if search.grace_period >= shortest:
            problems.append(f"scheduler.grace_period: {search.grace_period} steps leaves nothing to stop "
                            f"(trials train {shortest} steps); lower it or raise train.max_steps")
    if problems:
        raise SpecError(problems, search.source)


def _pbt_problems(search: Search) -> list[str]:
    from carousel.train.warm_start import PERTURBABLE
    from carousel.tune.pbt import perturbation_interval

    spec, problems = search.spec, []
    for path in spec.scheduler.mutate or []:
        if path not in spec.space:
            problems.append(f"scheduler.mutate: {path} is not a dimension of the space")
        elif path not in PERTURBABLE:
            problems.append(f"scheduler.mutate: {path} cannot change in a running trial (one of {', '.join(PERTURBABLE)})")
    if spec.scheduler.mutate == [] or not any(p in PERTURBABLE for p in spec.scheduler.mutate or spec.space):
        problems.append(f"space: pbt perturbs running trials, and none of {', '.join(spec.space)} can change in one "
                        f"(the space needs one of {', '.join(PERTURBABLE)})")
    if spec.search.kind != "random":
        problems.append("search.kind: pbt explores by itself; use random")
    population = spec.num_samples
    for dim in spec.space.values():
        population *= len(dim.values) if isinstance(dim, Grid) else 1
    if population < 2:
        problems.append("num_samples: pbt needs a population (at least 2 trials: num_samples x grid points)")
    interval = perturbation_interval(search)
    every = max(s.run.checkpoint_every for s in search.specs())
    shortest = min(s.train.max_steps for s in search.specs())
    if any(interval % s.run.checkpoint_every for s in search.specs()):
        problems.append(f"scheduler.perturbation_interval: {interval} steps is not a multiple of run.checkpoint_every "
                        f"({every}): an exploit copies the state of the strong trial's latest checkpoint")
    if interval >= shortest:
        problems.append(f"scheduler.perturbation_interval: {interval} steps leaves no perturbation before the end "
                        f"(trials train {shortest} steps)")
    return problems


def build_search(raw: dict[str, Any], source: str | None = None, base_dir: str | Path | None = None,
                 absolute: Callable[[JobSpec], JobSpec] | None = None) -> Search:
    """Validate a tune spec dict and its base job spec (read from ``base_dir`` / ``base``).

    ``absolute`` makes the base spec's local paths absolute (the CLI's, which knows the working
    directory): trials run in directories of their own."""
    spec = _tune_spec(raw, source)
    base_path = Path(spec.base)
    if not base_path.is_absolute() and base_dir is not None:
        base_path = Path(base_dir) / base_path
    base_raw = apply_overrides(read_yaml(base_path), spec.set)
    base = spec_from_dict(base_raw, str(base_path))
    if absolute is not None:
        base = absolute(base)
    search = Search(spec, base, source)
    search.candidates = check_space(spec, base, source)
    check_search(search)
    return search


def load_search(path: str | Path, overrides: list[str] | None = None,
                absolute: Callable[[JobSpec], JobSpec] | None = None) -> Search:
    path = Path(path)
    raw = apply_tune_overrides(read_yaml(path), overrides or [])
    if not is_tune_spec(raw):
        raise SpecError(["not a tune spec: it needs `base:` (a job spec) and `space:`"], str(path))
    return build_search(raw, str(path), path.parent, absolute)


def search_from_record(tune: dict[str, Any], base: dict[str, Any]) -> Search:
    """A recorded search (resolved tune spec + resolved base job spec), for --resume."""
    spec = _tune_spec(tune, "recorded search")
    search = Search(spec, spec_from_dict(base, "recorded base spec"), "recorded search")
    search.candidates = check_space(spec, search.base, "recorded search")
    return search


def preflight_search(search: Search) -> None:
    """The data checks of `carousel train` for the distinct candidate specs (batch sizes, windows)."""
    import json

    from carousel.data.shards import DataError
    from carousel.train.launcher import preflight

    seen: set[str] = set()
    for values, s in [({}, search.base), *search.candidates]:
        key = json.dumps(s.model_dump(mode="json"), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > MAX_PREFLIGHTS:
            break
        try:
            preflight(s)
        except DataError as e:
            where = ", ".join(f"{p}={_value(v)}" for p, v in values.items())
            raise DataError(f"{e}" + (f" (with {where})" if where else "")) from None
