from pathlib import Path

import pytest
import yaml

from flywheel.config import ConfigError, FlywheelConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs").glob("*.yml"))


def test_recipes_exist():
    assert RECIPES, "configs/ holds no YAML recipe"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    config = load_config(recipe, base_dir=ROOT)
    assert isinstance(config, FlywheelConfig)
    raw = yaml.safe_load(recipe.read_text()) or {}
    # What the file says is what the object holds (nothing silently dropped or defaulted over).
    if "name" in raw:
        assert config.name == raw["name"]
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if not isinstance(value, dict):
                    assert getattr(getattr(config, section), key) == value, f"{section}.{key}"


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data)


def _with_file(extra: Path, data: dict) -> str:
    extra.write_text("hello")
    return _yaml(data)


# (case id, file content -- a callable of tmp_path for cases that need other files, fragments the message must hold)
BAD_CONFIGS = [
    ("unknown-top-level-key", _yaml({"nmae": "x"}), ["nmae", "unknown key"]),
    ("unknown-nested-key", _yaml({"generation": {"temprature": 0.5}}), ["generation.temprature", "unknown key"]),
    ("wrong-type", _yaml({"generation": {"batch_size": "many"}}), ["generation.batch_size", "'many'"]),
    ("out-of-range", _yaml({"prompts": {"eval_fraction": 1.5}}), ["prompts.eval_fraction", "1.5"]),
    ("out-of-range-negative", _yaml({"generation": {"temperature": -0.1}}), ["generation.temperature"]),
    ("builtin-count-too-small", _yaml({"prompts": {"builtin_count": 4}}), ["prompts.builtin_count"]),
    ("builtin-count-with-a-file", lambda tmp: _with_file(tmp / "p.jsonl", {"prompts": {"source": "p.jsonl",
                                                                                        "builtin_count": 512}}),
     ["builtin_count applies to the builtin source only", "p.jsonl"]),
    ("bad-literal", _yaml({"training": {"method": "ppo"}}), ["training.method", "'ppo'"]),
    ("bad-review-timeout-action", _yaml({"review": {"on_timeout": "approve"}}), ["review.on_timeout", "'approve'"]),
    ("section-not-mapping", _yaml({"generation": 5}), ["generation"]),
    ("malformed-yaml", "name: x\ngeneration:\n  batch_size: [1, 2\nfeedback: {}\n", ["malformed YAML", "line 4"]),
    ("non-mapping-yaml", "- a\n- b\n", ["mapping", "list"]),
    ("scalar-yaml", "just words\n", ["mapping", "str"]),
    ("dpo-one-sample", _yaml({"training": {"method": "dpo"}, "generation": {"samples_per_prompt": 1}}),
     ["samples_per_prompt", "dpo"]),
    ("unknown-strategy", _yaml({"strategy": {"name": "ppo"}}), ["strategy.name", "'ppo'"]),
    ("strategy-method-mismatch", _yaml({"strategy": {"name": "sami"}, "training": {"method": "dpo"}}),
     ["strategy 'sami'", "'sami'", "not 'dpo'"]),
    ("method-without-its-strategy", _yaml({"training": {"method": "grpo"}}),
     ["strategy 'best_of_n'", "not 'grpo'"]),
    ("distill-without-teacher", _yaml({"strategy": {"name": "distill"}, "training": {"method": "sft"}}),
     ["strategy", "distill section with its teacher"]),
    ("spar-zero-breadth", _yaml({"strategy": {"name": "spar", "spar": {"breadth": 0}}}),
     ["strategy.spar.breadth"]),
    ("sami-one-constitution", _yaml({"strategy": {"name": "sami", "sami": {"constitutions_per_prompt": 1}},
                                     "training": {"method": "sami"}}),
     ["strategy.sami.constitutions_per_prompt"]),
    ("two-llm-judges", _yaml({"feedback": {"judges": ["verifier", "self", "reward_model"]}}),
     ["one judge besides the verifier"]),
    ("distill-teacher-folder-missing", _yaml({"strategy": {"name": "distill", "distill": {
        "teacher": {"model": "./no-such-teacher"}}}, "training": {"method": "sft"}}),
     ["strategy.distill.teacher.model", "model folder not found"]),
    ("sami-writer-folder-missing", _yaml({"strategy": {"name": "sami", "sami": {"writer": "./no-writer"}},
                                          "training": {"method": "sami"}}),
     ["strategy.sami.writer", "model folder not found"]),
    ("quality-min-over-max", _yaml({"quality": {"min_chars": 50, "max_chars": 10}}),
     ["quality", "min_chars (50)", "max_chars (10)"]),
    ("prompt-file-missing", _yaml({"prompts": {"source": "prompts/missing.jsonl"}}),
     ["prompts.source", "file not found", "missing.jsonl"]),
    ("prompt-suffix", lambda tmp: _with_file(tmp / "prompts.txt", {"prompts": {"source": "prompts.txt"}}),
     ["prompts.source", "unsupported file type '.txt'"]),
    ("model-folder-missing", _yaml({"model": {"base": "./models/none"}}), ["model.base", "not found", "none"]),
    ("registered-name-pattern", _yaml({"model": {"registered_name": "bad name!"}}), ["model.registered_name"]),
    ("compute-type-needs-ctranslate2", _yaml({"generation": {"compute_type": "int8"}}),
     ["generation", "compute_type 'int8' needs engine 'ctranslate2'"]),
    ("unknown-compute-type", _yaml({"generation": {"engine": "ctranslate2", "compute_type": "int4"}}),
     ["generation.compute_type", "'int4'"]),
    ("keep-refused-without-refused", _yaml({"storage": {"prune_after_round": "copies", "keep_refused": 2}}),
     ["storage", "keep_refused: 2 applies only with prune_after_round 'refused'", "'copies'"]),
    ("unknown-prune-mode", _yaml({"storage": {"prune_after_round": "all"}}), ["storage.prune_after_round", "'all'"]),
    ("prune-mode-yes", "storage:\n  prune_after_round: yes\n", ["storage.prune_after_round", "True"]),
    ("echo-ngram-one-word", _yaml({"feedback": {"echo_ngram": 1}}), ["feedback.echo_ngram", "greater than or equal"]),
]


@pytest.mark.parametrize("content,fragments", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_file_and_field(tmp_path, content, fragments):
    text = content(tmp_path) if callable(content) else content
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, base_dir=tmp_path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_malformed_yaml_reports_line_and_column(tmp_path):
    path = _write(tmp_path, "name: ok\nseed: 1\ntraining:\n\tmethod: sft\n")  # a tab on line 4
    with pytest.raises(ConfigError) as caught:
        load_config(path, base_dir=tmp_path)
    assert "line 4" in str(caught.value)
    assert str(path) in str(caught.value)


def test_non_utf8_config(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, base_dir=tmp_path)


def test_every_problem_is_reported_at_once(tmp_path):
    path = _write(tmp_path, _yaml({"generation": {"batch_size": 0, "top_p": 2}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path, base_dir=tmp_path)
    assert "generation.batch_size" in str(caught.value)
    assert "generation.top_p" in str(caught.value)


def test_relative_paths_resolve_against_base_dir(tmp_path):
    prompts = tmp_path / "data" / "prompts.jsonl"
    prompts.parent.mkdir()
    prompts.write_text("")
    (tmp_path / "model").mkdir()
    path = _write(tmp_path, _yaml({"prompts": {"source": "data/prompts.jsonl"}, "model": {"base": "./model"}}))
    config = load_config(path, base_dir=tmp_path)
    assert config.prompts.source == "data/prompts.jsonl"
    with pytest.raises(ConfigError, match="prompts.source"):
        load_config(path, base_dir=tmp_path / "elsewhere")


def test_hub_id_is_not_checked_as_a_path(tmp_path):
    path = _write(tmp_path, _yaml({"model": {"base": "HuggingFaceTB/SmolLM2-135M-Instruct"}}))
    assert load_config(path, base_dir=tmp_path).model.base == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_bare_yaml_off_is_the_prune_mode(tmp_path):
    # YAML 1.1 reads `off` as false; the field's mode of that name is meant.
    path = _write(tmp_path, "storage:\n  prune_after_round: off\n")
    assert load_config(path, base_dir=tmp_path).storage.prune_after_round == "off"


def test_empty_file_is_the_default_config(tmp_path):
    config = load_config(_write(tmp_path, ""), base_dir=tmp_path)
    assert config == FlywheelConfig()
    assert config.training.method == "dpo" and config.generation.samples_per_prompt == 4


def test_field_defaults_and_the_default_recipe_are_told_apart_in_lineage():
    # A flow called without a config runs the field defaults, which are not configs/default.yaml's recipe: the
    # flywheel.recipe tag (config.name) must not call both "default".
    recipe = load_config(ROOT / "configs" / "default.yaml", base_dir=ROOT)
    baseline = FlywheelConfig()
    assert baseline != recipe
    assert baseline.name != recipe.name
    assert all(load_config(path, base_dir=ROOT).name != baseline.name for path in RECIPES)


def test_sft_with_one_sample_is_fine():
    config = parse_config({"training": {"method": "sft"}, "generation": {"samples_per_prompt": 1}})
    assert config.generation.samples_per_prompt == 1


def test_config_is_frozen():
    config = FlywheelConfig()
    with pytest.raises(Exception):
        config.generation.batch_size = 3  # type: ignore[misc]


def test_config_hash_is_stable_and_changes_with_a_field():
    first = parse_config({"name": "a", "generation": {"temperature": 0.7}})
    again = parse_config({"generation": {"temperature": 0.7}, "name": "a"})
    assert first.config_hash() == again.config_hash()
    assert len(first.config_hash()) == 16
    assert first.config_hash() == FlywheelConfig.model_validate(first.model_dump()).config_hash()
    changed = parse_config({"name": "a", "generation": {"temperature": 0.8}})
    assert changed.config_hash() != first.config_hash()
    nested = parse_config({"name": "a", "generation": {"temperature": 0.7}, "training": {"lora": {"r": 8}}})
    assert nested.config_hash() != first.config_hash()
