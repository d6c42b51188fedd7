"""The language model as an MLflow pyfunc: generates text and scores perplexity.

Artifacts are the checkpoint's ``model/`` directory (fp32 weights loaded with weights_only=True,
model.json, tokenizer.json); the carousel package travels as code, so ``mlflow models serve`` and
``mlflow.pyfunc.load_model`` need nothing but the model's pip requirements.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from carousel.config import ModelConfig

# torch is imported where a model is loaded: the driver logs and registers the model without it
# (the checkpoint carries its sample generations, written by rank 0), ~2 s less at a run's end.
DEFAULT_PARAMS = {"task": "generate", "max_tokens": 60, "temperature": 0.8, "top_k": 40, "seed": 0}


class LoadedLM:
    """A language model and its tokenizer, loaded from a ``model/`` directory."""

    def __init__(self, model_dir: str | Path):
        import torch
        from tokenizers import Tokenizer

        from carousel.models.lm import LanguageModel

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / "model.json").read_text())
        self.meta = meta
        self.model = LanguageModel(ModelConfig.model_validate(meta["config"]), meta["vocab_size"])
        state = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def generate(self, prompt: str, max_tokens: int = 60, temperature: float = 0.8, top_k: int | None = 40, seed: int = 0) -> str:
        from carousel.models.lm import generate_text

        return generate_text(self.model, self.tokenizer, prompt, max_tokens, temperature, top_k, seed)

    def perplexity(self, text: str) -> float:
        import torch

        from carousel.data.tokenizer import encode_lines

        ids = [i for line in text.splitlines() if line.strip() for i in encode_lines(self.tokenizer, [line])[0]]
        if len(ids) < 2:
            return float("nan")
        with torch.no_grad():
            loss, _ = self.model(torch.tensor([ids[:-1]]), None, targets=torch.tensor([ids[1:]]))
        return math.exp(float(loss))


class LanguageModelPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.lm = LoadedLM(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list:
        p = {**DEFAULT_PARAMS, **(params or {})}
        if p["task"] == "score":
            return [self.lm.perplexity(t) for t in model_input["text"]]
        top_k = int(p["top_k"]) or None
        return [
            self.lm.generate(str(prompt), int(p["max_tokens"]), float(p["temperature"]), top_k, int(p["seed"]))
            for prompt in model_input["prompt"]
        ]


def log_and_register(
    model_dir: str,
    registered_model: str | None,
    alias: str,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """Log the model into the active MLflow run; register it and point ``alias`` at it if it is the best.

    "Best" compares validation perplexity with the version that holds the alias now, and only when
    both were trained with the same tokenizer (otherwise perplexities are not comparable and the
    newer model takes the alias).
    """
    from importlib.metadata import version

    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    import carousel

    # Either column: "prompt" (task generate) or "text" (task score); the output is text or floats.
    inputs = Schema([ColSpec("string", "prompt", required=False), ColSpec("string", "text", required=False)])
    params = infer_signature(pd.DataFrame({"prompt": ["x"]}), params=DEFAULT_PARAMS).params
    signature = ModelSignature(inputs=inputs, params=params)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=LanguageModelPyfunc(),
        artifacts={"model": model_dir},
        code_paths=[str(Path(carousel.__file__).parent)],
        signature=signature,
        pip_requirements=[f"torch=={version('torch').split('+')[0]}", "tokenizers", "pydantic", "pandas"],
        registered_model_name=registered_model,
    )
    out: dict[str, Any] = {"model_uri": info.model_uri}
    if not registered_model:
        return out
    from carousel.tracking.registry import register_version

    tok_sha = json.loads((Path(model_dir) / "model.json").read_text()).get("tokenizer_sha256", "")
    out.update(register_version(registered_model, str(info.registered_model_version), alias, metrics,
                                data_id=tok_sha, metric="val_ppl"))
    return out
