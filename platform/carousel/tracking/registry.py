"""Registering a logged model version and deciding whether it takes the alias (both families)."""

from __future__ import annotations

from typing import Any

import mlflow


def register_version(registered_model: str, version: str, alias: str, metrics: dict[str, float],
                     data_id: str, metric: str) -> dict[str, Any]:
    """Tag the version with its metrics and data identity; move ``alias`` to it if it is the best.

    "Best" compares ``metric`` (lower is better) with the version holding the alias now, and only
    when both were trained on the same data identity (tokenizer / vocabulary + features): otherwise
    the figures are not comparable and the newer model takes the alias.
    """
    c = mlflow.MlflowClient()
    c.set_model_version_tag(registered_model, version, "data_id", data_id)
    for k, v in metrics.items():
        c.set_model_version_tag(registered_model, version, k, f"{v:.6g}")
    best = True
    try:
        holder = c.get_model_version_by_alias(registered_model, alias)
        if holder.tags.get("data_id") == data_id and metric in holder.tags and metric in metrics:
            best = metrics[metric] <= float(holder.tags[metric])
    except mlflow.exceptions.MlflowException:
        pass  # no holder yet
    if best:
        c.set_registered_model_alias(registered_model, alias, version)
    return {"registered_model": registered_model, "version": version, "alias": alias if best else None}
