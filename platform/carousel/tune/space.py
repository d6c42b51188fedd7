"""Search spaces: one dimension per dotted JobSpec field, written in YAML, turned into Ray Tune domains.

A dimension is written either long (``{kind: loguniform, low: 1.0e-4, high: 1.0e-2}``) or short
(``{loguniform: [1.0e-4, 1.0e-2]}``, ``{choice: [lstm, gru]}``). ``randint`` follows Tune: ``high``
is exclusive. ``grid`` tries every value (times ``num_samples``); the others are sampled.

Each dimension also says which values to check before anything starts (``candidates``): every
choice/grid value, the bounds of a range. Building the job spec at those values catches a field
that does not exist and a range that leaves the field's own limits, with the field's dotted path.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

KINDS = ("choice", "uniform", "loguniform", "randint", "grid")


class _Dim(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _short_form(v: Any) -> Any:
    """{loguniform: [a, b]} -> {kind: loguniform, low: a, high: b}; {choice: [...]} -> values."""
    if not isinstance(v, dict):
        raise ValueError("a dimension is a mapping such as {choice: [...]} or {loguniform: [low, high]}")
    if "kind" in v:
        if v["kind"] not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)} (got {v['kind']!r})")
        return v
    if len(v) != 1 or next(iter(v)) not in KINDS:
        raise ValueError(f"expected one of {', '.join(KINDS)}")
    (kind, arg), = v.items()
    if kind in ("uniform", "loguniform", "randint"):
        if not (isinstance(arg, (list, tuple)) and len(arg) == 2):
            raise ValueError(f"{kind}: expected [low, high]")
        return {"kind": kind, "low": arg[0], "high": arg[1]}
    return {"kind": kind, "values": arg}


class Choice(_Dim):
    kind: Literal["choice"]
    values: list[Any] = Field(min_length=1)

    def to_tune(self):
        from ray import tune

        return tune.choice(self.values)

    def candidates(self) -> list[Any]:
        return list(self.values)

    def describe(self) -> str:
        return f"choice({self.values})"


class Grid(_Dim):
    kind: Literal["grid"]
    values: list[Any] = Field(min_length=1)

    def to_tune(self):
        from ray import tune

        return tune.grid_search(self.values)

    def candidates(self) -> list[Any]:
        return list(self.values)

    def describe(self) -> str:
        return f"grid({self.values})"


class Uniform(_Dim):
    kind: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _range(self) -> "Uniform":
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self

    def to_tune(self):
        from ray import tune

        return tune.uniform(self.low, self.high)

    def candidates(self) -> list[Any]:
        return [self.low, self.high]

    def describe(self) -> str:
        return f"uniform({self.low:g}, {self.high:g})"


class LogUniform(Uniform):
    kind: Literal["loguniform"]

    @model_validator(mode="after")
    def _positive(self) -> "LogUniform":
        if self.low <= 0:
            raise ValueError(f"low ({self.low}) must be > 0 on a log scale")
        return self

    def to_tune(self):
        from ray import tune

        return tune.loguniform(self.low, self.high)

    def describe(self) -> str:
        return f"loguniform({self.low:g}, {self.high:g})"


class RandInt(_Dim):
    kind: Literal["randint"]
    low: int
    high: int = Field(description="exclusive, as in ray.tune.randint")

    @model_validator(mode="after")
    def _range(self) -> "RandInt":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high}, exclusive)")
        return self

    def to_tune(self):
        from ray import tune

        return tune.randint(self.low, self.high)

    def candidates(self) -> list[Any]:
        return [self.low, self.high - 1]

    def describe(self) -> str:
        return f"randint({self.low}, {self.high})"


Dimension = Annotated[Union[Choice, Grid, Uniform, LogUniform, RandInt], Field(discriminator="kind"),
                      BeforeValidator(_short_form)]

# Fields a trial may not change: they name or place the search's runs, or size the trials
# (concurrency is planned from one trial's resources).
FIXED_SECTIONS = ("name", "run", "tracking", "scaling")


def fixed_field(path: str) -> str | None:
    """Why ``path`` cannot be tuned (None when it can)."""
    head = path.split(".", 1)[0]
    if head in FIXED_SECTIONS:
        return (f"not tunable: {head} is the same for every trial (set it in the base job spec)"
                if head != "name" else "not tunable: trials are named by the search")
    if path in ("model.family",):
        return "not tunable: every trial of a search trains the same model family"
    return None


def param_space(space: dict[str, Any]) -> dict[str, Any]:
    """The Tune param_space: the dotted paths stay flat keys (Tune's own separator is "/")."""
    return {path: dim.to_tune() for path, dim in space.items()}


def is_grid(space: dict[str, Any]) -> bool:
    return any(isinstance(d, Grid) for d in space.values())


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the job spec dict with each dotted path set to its (already typed) value.

    Not config.apply_overrides: that parses ``a.b=text`` as YAML, and sampled floats such as
    1e-05 would come back as strings from PyYAML.
    """
    import copy

    from carousel.config import set_dotted

    out = copy.deepcopy(raw)
    for path, value in values.items():
        set_dotted(out, path.split("."), value)
    return out
