import pytest
import yaml

from carousel.config import SpecError, apply_overrides, flatten, load_spec, spec_from_dict

BASE = {
    "name": "t",
    "data": {"path": "data/x"},
    "model": {"layers": 2, "hidden": 32, "embed": 32},
    "train": {"max_steps": 10, "eval_every": 5},
    "run": {"checkpoint_every": 5},
}


def problems(raw):
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw)
    return e.value.problems


def test_valid_spec_parses_with_defaults():
    spec = spec_from_dict(BASE)
    assert spec.model.cell == "lstm" and spec.train.precision == "fp32" and spec.run_name == "t"


def test_errors_name_the_dotted_field():
    raw = apply_overrides(BASE, ["train.lr=0", "model.hiden=3", "scaling.num_workers=0"])
    p = problems(raw)
    assert "train.lr: must be > 0.0" in p
    assert "model.hiden: unknown field" in p
    assert "scaling.num_workers: must be >= 1" in p


def test_cross_field_rules_name_the_field():
    assert any(x.startswith("model.tie_weights:") for x in problems(apply_overrides(BASE, ["model.embed=16"])))
    assert any(x.startswith("model.proj:") for x in problems(apply_overrides(BASE, ["model.cell=gru", "model.proj=8", "model.tie_weights=false"])))
    assert any(x.startswith("train.warmup_steps:") for x in problems(apply_overrides(BASE, ["train.warmup_steps=10"])))
    assert any(x.startswith("run.checkpoint_every:") for x in problems(apply_overrides(BASE, ["run.checkpoint_every=7"])))


def test_overrides_parse_yaml_values_and_reject_non_sections():
    raw = apply_overrides(BASE, ["train.lr=3e-4", "train.betas=[0.8, 0.9]", "model.residual=false"])
    spec = spec_from_dict(raw)
    assert spec.train.lr == 3e-4 and spec.train.betas == (0.8, 0.9) and spec.model.residual is False
    with pytest.raises(SpecError, match="train.lr: is not a section"):
        apply_overrides(apply_overrides(BASE, ["train.lr=0.1"]), ["train.lr.x=1"])
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        apply_overrides(BASE, ["train.lr"])


def test_python_yaml_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    assert not marker.exists()


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(p)


def test_repo_job_specs_are_valid():
    from pathlib import Path

    for job in sorted(Path(__file__).resolve().parents[2].glob("jobs/lm-*.yaml")):
        load_spec(job)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_explicit_ray_address_uses_an_available_token(monkeypatch, tmp_path):
    from carousel.ray_session import auth_env_for

    token = tmp_path / "tok"
    token.write_text("x" * 32)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert auth_env_for("10.0.0.1:6379") == {"RAY_AUTH_MODE": "token"}
    assert auth_env_for(None) == {} and auth_env_for("auto") == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is respected
    assert auth_env_for("10.0.0.1:6379") == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert auth_env_for("10.0.0.1:6379") == {}
