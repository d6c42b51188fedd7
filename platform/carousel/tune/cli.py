"""`carousel tune SPEC` and `carousel tune --resume NAME` (registered on the main app by carousel.cli)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def _absolute_path(p: str) -> str:
    return p if "://" in p else os.path.abspath(p)


def _load(spec_path: Path, overrides: list[str] | None):
    """Validate a tune spec, its base job spec and its space, and the data; paths made absolute."""
    from carousel.cli import _absolute, _fail
    from carousel.config import SpecError
    from carousel.data.shards import DataError
    from carousel.tune.spec import load_search, preflight_search

    try:
        search = load_search(spec_path, overrides or [], absolute=_absolute)
        preflight_search(search)
    except (SpecError, DataError) as e:
        _fail(str(e))
    return search


def load_for_submit(job: Path, overrides: list[str] | None):
    """For `carousel submit`: (the job spec whose paths the submission pins, "train" | "tune")."""
    from carousel.cli import _fail
    from carousel.cli import _load as load_job
    from carousel.config import SpecError, read_yaml
    from carousel.tune.spec import is_tune_spec

    try:
        raw = read_yaml(job)
    except SpecError as e:
        _fail(str(e))
    if is_tune_spec(raw):
        return _load(job, overrides).base, "tune"
    return load_job(job, overrides), "train"


def tune(
    spec: Annotated[Optional[Path], typer.Argument(help="tune spec YAML (a base job spec + a search space)")] = None,
    set: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override a tune spec field (num_samples=8), a base spec field (base.train.max_steps=200) "
                      "or a dimension (space.train.lr={loguniform: [1e-4, 1e-2]})")] = None,
    resume: Annotated[Optional[str], typer.Option(help="continue the interrupted search NAME (under --storage-path)")] = None,
    storage_path: Annotated[str, typer.Option(help="with --resume: where the search lives (the base spec's run.storage_path)")] = "runs",
    address: Annotated[Optional[str], typer.Option("--address", envvar="RAY_ADDRESS",
                                                   help="Ray cluster address (default: an embedded local Ray)")] = None,
) -> None:
    """Search hyperparameters: Ray Tune trials, each a Ray Train + DeepSpeed run; MLflow parent + child runs."""
    from carousel.cli import _fail
    from carousel.config import SpecError
    from carousel.tracking.store import TrackingUnavailable, require_tracking_server, resolve_tracking_uri
    from carousel.tune.runner import SearchError, fresh_name_check, resume_record, run_search
    from carousel.tune.spec import search_from_record

    record = None
    try:
        if resume:
            if spec is not None:
                _fail("give a tune spec or --resume NAME, not both")
            record = resume_record(_absolute_path(storage_path), resume)
            search = search_from_record(record.tune, record.base)
        elif spec is None:
            _fail("give a tune spec (carousel tune SPEC.yaml) or --resume NAME")
        else:
            search = _load(spec, set)
            fresh_name_check(search.base.run.storage_path, search.spec.name)
    except (SearchError, SpecError) as e:
        _fail(str(e))
    uri = record.tracking_uri if record else resolve_tracking_uri(search.base.tracking.uri)
    try:  # a tracking server down or refusing at start: fail here, before Ray or a run starts
        require_tracking_server(uri)
    except TrackingUnavailable as e:
        _fail(str(e))
    from carousel.ray_session import RayConnectionError

    try:
        outcome = run_search(search, address, uri, resume_record=record)
    except RayConnectionError as e:  # nothing started
        _fail(str(e))
    except (SearchError, SpecError) as e:
        _fail(str(e), 1)

    typer.echo("")
    counts = {}
    for r in outcome.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{v} {k.lower().replace('_', ' ')}" for k, v in sorted(counts.items()))
    typer.secho(f"search {outcome.name}: {outcome.status} in {outcome.seconds:.0f}s ({len(outcome.rows)} trials: {summary})",
                bold=True)
    if outcome.table:
        typer.echo(outcome.table)
    if outcome.best is not None:
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in outcome.best.values.items())
        typer.echo(f"  best trial {outcome.best.trial_id}: {outcome.metric} {outcome.best.best:.4g} ({values})")
    m = outcome.model
    if m.get("registered_model"):
        alias = m.get("alias")
        typer.echo(f"  registered model models:/{m['registered_model']}/{m['version']}"
                   + (f" (alias @{alias})" if alias else " (the alias stays with a better version)"))
    if outcome.status == "KILLED":
        typer.echo(f"  interrupted; continue with: carousel tune --resume {outcome.name} --storage-path {outcome.storage_path}")
    typer.echo(f"  MLflow: carousel ui   (tracking {outcome.tracking_uri}, parent run {outcome.parent_run_id})")
    if outcome.status == "FAILED":
        raise typer.Exit(1)
