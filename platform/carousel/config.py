"""Job specs: YAML in, pydantic models out.

Everything a run needs is decided here, before Ray, MLflow or any file is touched: unknown keys
and bad values are rejected with the dotted path of the field (``train.lr: must be > 0``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator


class SpecError(ValueError):
    """A job spec that cannot run; the message names the file and every bad field."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid job spec {source}" if source else "invalid job spec"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    path: str = Field(description="prepared dataset directory or URI (holds manifest.json)")
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    verify_checksums: bool = Field(True, description="check each shard's sha256 before reading it")


class ModelConfig(Strict):
    family: Literal["lm"] = "lm"
    cell: Literal["lstm", "gru"] = "lstm"
    layers: int = Field(2, ge=1, le=64)
    hidden: int = Field(256, ge=1)
    embed: int = Field(256, ge=1)
    proj: int | None = Field(None, ge=1, description="LSTM output projection size (LSTMP)")
    residual: bool = Field(True, description="add each layer's input to its output when shapes match")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="locked dropout between layers")
    embed_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="drops whole word embeddings")
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="locked dropout on the embeddings")
    output_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="locked dropout before the head")
    tie_weights: bool = True
    gate_bias: float = Field(1.0, description="initial forget-gate (LSTM) / update-gate (GRU) bias")

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        if self.proj is not None:
            if self.cell != "lstm":
                raise ValueError("proj: a projection needs cell: lstm")
            if self.proj >= self.hidden:
                raise ValueError(f"proj: must be < hidden ({self.hidden})")
        if self.tie_weights and self.embed != self.output_size:
            raise ValueError(
                f"tie_weights: needs embed ({self.embed}) == the core's output size "
                f"({self.output_size}); set embed, proj or tie_weights: false"
            )
        return self

    @property
    def output_size(self) -> int:
        return self.proj or self.hidden


class FrontendConfig(Strict):
    """Acoustic frontend: how feature frames become the recurrent core's (fewer) input steps."""

    kind: Literal["stack", "conv"] = Field(
        "stack", description="stack: concatenate `stride` frames; conv: 2-D conv layers, each stride 2"
    )
    stride: int = Field(3, ge=1, le=8, description="feature frames per CTC output step")
    channels: int = Field(32, ge=1, description="conv: channels of each conv layer")
    size: int | None = Field(None, ge=1, description="linear projection after the frontend (None: none)")

    @model_validator(mode="after")
    def _stride(self) -> "FrontendConfig":
        if self.kind == "conv" and self.stride not in (2, 4, 8):
            raise ValueError("stride: a conv frontend subsamples by 2 per layer, so stride must be 2, 4 or 8")
        return self


class SpecAugmentConfig(Strict):
    """Time and frequency masks on training features (Park et al. 2019); counts 0 turn it off."""

    freq_masks: int = Field(2, ge=0)
    freq_width: int = Field(10, ge=0, description="max mel bins per frequency mask")
    time_masks: int = Field(2, ge=0)
    time_width: int = Field(20, ge=0, description="max frames per time mask")
    time_ratio: float = Field(0.1, ge=0.0, le=1.0, description="a time mask covers at most this share of the utterance")


class CTCModelConfig(Strict):
    """Acoustic model: frontend -> stacked (Bi)LSTM/GRU -> CTC head over the dataset's characters."""

    family: Literal["ctc"]
    cell: Literal["lstm", "gru"] = "lstm"
    layers: int = Field(3, ge=1, le=64)
    hidden: int = Field(256, ge=1)
    proj: int | None = Field(None, ge=1, description="LSTM output projection size (LSTMP)")
    bidirectional: bool = True
    residual: bool = True
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="locked dropout between layers")
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    output_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    gate_bias: float = 1.0
    frontend: FrontendConfig = FrontendConfig()
    specaugment: SpecAugmentConfig = SpecAugmentConfig()

    @model_validator(mode="after")
    def _shapes(self) -> "CTCModelConfig":
        if self.proj is not None:
            if self.cell != "lstm":
                raise ValueError("proj: a projection needs cell: lstm")
            if self.proj >= self.hidden:
                raise ValueError(f"proj: must be < hidden ({self.hidden})")
        return self

    @property
    def output_size(self) -> int:
        return (self.proj or self.hidden) * (2 if self.bidirectional else 1)


FAMILIES = ("lm", "ctc")


def _family(v: Any) -> str:
    # Specs written before there were families have no `family` key: they are LMs.
    return (v.get("family", "lm") if isinstance(v, dict) else getattr(v, "family", "lm")) or "lm"


AnyModelConfig = Annotated[
    Union[Annotated[ModelConfig, Tag("lm")], Annotated[CTCModelConfig, Tag("ctc")]],
    Discriminator(_family, custom_error_type="invalid_family",
                  custom_error_message="family: must be one of lm, ctc"),
]


class SpeechConfig(Strict):
    """Batching, evaluation and decoding of the ctc family."""

    frames_per_batch: int = Field(
        6000, ge=1, description="per worker and micro-batch: utterances x longest utterance (padded feature frames)"
    )
    eval_utterances: int | None = Field(None, ge=1, description="cap utterances per validation pass (None: all)")
    normalization: Literal["global", "speaker"] = Field(
        "global", description="feature mean/variance: the training split's (global) or each speaker's (speaker)"
    )
    decoder: Literal["greedy", "beam"] = "greedy"
    beam_width: int = Field(16, ge=1)
    lm: str | None = Field(None, description="beam: shallow fusion with a char-level Carousel LM: models:/NAME@ALIAS or a checkpoint")
    lm_weight: float = Field(0.5, ge=0.0, description="weight of the LM's log-probability in the beam score")
    word_bonus: float = Field(0.0, description="added to the beam score per word (offsets the LM's cost of each word)")
    librivox: bool = Field(True, description="at the end, WER/CER on the LibriVox clips of pocketsphinx-testdata")
    sample_rows: int = Field(20, ge=0, description="reference/hypothesis pairs logged as an MLflow table")

    @model_validator(mode="after")
    def _lm_needs_beam(self) -> "SpeechConfig":
        if self.lm is not None and self.decoder != "beam":
            raise ValueError("lm: shallow fusion needs decoder: beam")
        return self


class TrainConfig(Strict):
    max_steps: int = Field(ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="parallel token streams per worker")
    bptt: int = Field(64, ge=2, description="truncated-BPTT window length in tokens")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2] = 0
    eval_every: int = Field(100, ge=1)
    eval_batches: int | None = Field(None, ge=1, description="cap validation windows (None: all)")
    log_every: int = Field(10, ge=1)
    halt_at_step: int | None = Field(
        None, ge=1, description="checkpoint and stop cleanly at this step; resume later"
    )
    max_nonfinite_steps: int = Field(
        5, ge=1, description="stop the run after this many optimizer steps in a row skipped for NaN/Inf"
    )
    inject_nonfinite_steps: list[int] = Field(
        default_factory=list, description="fault drill: make the loss NaN at these steps (tests, runbooks)"
    )

    @model_validator(mode="after")
    def _steps(self) -> "TrainConfig":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps: must be < max_steps ({self.max_steps})")
        if self.halt_at_step is not None and self.halt_at_step >= self.max_steps:
            raise ValueError(f"halt_at_step: must be < max_steps ({self.max_steps})")
        return self


class ScalingConfig(Strict):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0, ge=0)
    placement: Literal["PACK", "SPREAD"] = "PACK"
    resources_timeout_s: float = Field(
        60.0, ge=0, description="on a cluster: wait this long for nodes that fit every worker (autoscaling, "
        "pods starting), then fail before any run exists; an embedded Ray never waits"
    )


class RunConfig(Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: str = Field("runs", description="local dir or URI for checkpoints and run state")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts (-1: unlimited)")
    checkpoint_every: int = Field(100, ge=1)
    keep_best: int = Field(2, ge=1, description="checkpoints kept, ranked by the family's validation metric (val_ppl, val_cer)")
    init_from: str | None = Field(
        None, description="a Carousel checkpoint (dir or URI) to continue from when the run has none of its own: "
        "weights, optimizer, schedule position, data position, step; this spec's optimizer settings apply "
        "(PBT's exploit, or branching a run with a new learning rate)"
    )


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = "carousel"
    registered_model: str | None = None
    alias: str = "best"
    log_system_metrics: bool = True
    system_metrics_interval: float = Field(10.0, gt=0, description="seconds between CPU/memory samples")
    sample_prompts: list[str] = Field(default_factory=lambda: ["In the beginning"])
    sample_tokens: int = Field(40, ge=1)


class JobSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    data: DataConfig
    model: AnyModelConfig = ModelConfig()
    train: TrainConfig
    speech: SpeechConfig | None = None
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cadence(self) -> "JobSpec":
        if self.speech is not None and self.model.family != "ctc":
            raise ValueError("speech: only for model.family ctc")
        if self.model.family == "ctc" and self.speech is None:
            self.__dict__["speech"] = SpeechConfig()  # defaults, without re-running validation
        if self.run.checkpoint_every % self.train.eval_every:
            # Checkpoints are ranked by a validation metric, so each one must carry a fresh value.
            raise ValueError(
                f"run.checkpoint_every: must be a multiple of train.eval_every ({self.train.eval_every})"
            )
        return self

    @property
    def run_name(self) -> str:
        return self.run.name or self.name


# ----------------------------------------------------------------------------- loading


def _format_error(err: dict[str, Any]) -> str:
    loc = list(err["loc"])
    if len(loc) > 1 and loc[0] == "model" and loc[1] in FAMILIES:
        del loc[1]  # the union's tag: the user wrote model.hidden, not model.ctc.hidden
    path = ".".join(str(p) for p in loc if p not in ("function-after",))
    kind, ctx = err["type"], err.get("ctx", {})
    messages = {
        "extra_forbidden": "unknown field",
        "missing": "required field is missing",
        "greater_than": f"must be > {ctx.get('gt')}",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "less_than": f"must be < {ctx.get('lt')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
    }
    if kind == "invalid_family":
        got = err["input"].get("family") if isinstance(err.get("input"), dict) else err.get("input")
        return f"{path}.family: must be one of {', '.join(FAMILIES)} (got {got!r})"
    msg = messages.get(kind)
    if msg is None:
        msg = err["msg"].removeprefix("Value error, ")
        # Model validators report "field: reason"; hang the field under the model's path.
        if kind == "value_error" and ": " in msg and " " not in msg.split(": ", 1)[0]:
            field, msg = msg.split(": ", 1)
            path = f"{path}.{field}" if path else field
        elif "input" in err and kind not in ("model_type", "dict_type"):
            msg = f"{msg} (got {err['input']!r})"
    return f"{path or '<root>'}: {msg}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c), the value parsed as YAML so numbers and lists keep their type."""
    if "=" not in item:
        raise SpecError([f"--set {item}: expected KEY.PATH=VALUE"])
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError([f"--set {item}: empty field name in {key!r}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SpecError([f"--set {key}: value is not valid YAML ({e})"]) from None
    return parts, value


def set_dotted(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    """raw[a][b][c] = value for parts [a, b, c], creating sections; ValueError names a non-section."""
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {'.'.join(parts)}")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        try:
            set_dotted(out, parts, value)
        except ValueError as e:
            raise SpecError([str(e)]) from None
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(["file not found"], str(path)) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"not UTF-8 text ({e})"], str(path)) from None
    try:
        # safe_load only: a spec must never be able to construct Python objects.
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {e}"], str(path)) from None
    if not isinstance(raw, dict):
        raise SpecError(["the top level must be a mapping"], str(path))
    return raw


def spec_from_dict(raw: dict[str, Any], source: str | None = None) -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError([_format_error(err) for err in e.errors()], source) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    raw = apply_overrides(read_yaml(path), overrides or [])
    return spec_from_dict(raw, str(path))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": v}; how params are named in MLflow and in --set."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
