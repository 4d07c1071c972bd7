"""The flywheel's one typed configuration object, loaded from YAML recipes in ``configs/``.

Every section forbids unknown keys so a typo fails before any work starts, and errors name the file and the
field. Rounds differ by recipe, never by code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUILTIN_PREFIX = "builtin:"
DEFAULT_BASE_MODEL = "builtin:smollm2-135m-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    base: str = Field(
        DEFAULT_BASE_MODEL,
        description="Base policy: 'builtin:smollm2-135m-instruct', a local Hugging Face model folder, or a hub id.",
    )
    registered_name: str = Field(
        "flywheel-policy", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Name of the policy's registered model in MLflow.",
    )


class PromptsConfig(Section):
    source: str = Field(
        "builtin", description="'builtin' (synthesized topics x verifiable constraints) or a JSONL/CSV/Parquet file."
    )
    eval_fraction: float = Field(0.25, gt=0, lt=1, description="Share of prompts held out for evaluation.")
    per_round: int = Field(64, ge=1, description="Training prompts answered in one round.")
    eval_limit: int = Field(48, ge=1, description="Held-out prompts scored per evaluation.")
    seed: int = 0


class GenerationConfig(Section):
    engine: Literal["transformers"] = "transformers"
    samples_per_prompt: int = Field(4, ge=1, le=64)
    max_new_tokens: int = Field(96, ge=1, le=4096)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(32, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FeedbackConfig(Section):
    judges: list[Literal["verifier"]] = Field(default_factory=lambda: ["verifier"], min_length=1)
    strict: bool = Field(True, description="Strict verifiers; loose also accepts markdown-stripped variants.")
    chosen_must_pass: bool = Field(
        True, description="A pair's chosen sample must satisfy every constraint; off: any higher score will do."
    )
    min_score_gap: float = Field(0.0, ge=0, le=1, description="Chosen must beat rejected by more than this.")
    sft_min_score: float = Field(1.0, ge=0, le=1, description="Samples at or above this score become SFT rows.")


class QualityConfig(Section):
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(4000, ge=1)
    max_failed_fraction: float = Field(0.2, ge=0, le=1, description="The round stops when more rows fail.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> QualityConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        return self


class ReviewConfig(Section):
    mode: Literal["auto", "required"] = "auto"
    sample_size: int = Field(8, ge=1)
    timeout_s: int = Field(24 * 3600, ge=1, description="How long a required review may wait before the run fails.")


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)


class TrainingConfig(Section):
    method: Literal["dpo", "sft"] = "dpo"
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: as many as epochs need.")
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(384, ge=16)
    beta: float = Field(0.1, gt=0, description="DPO temperature.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on a capable GPU, else fp32.")
    lora: LoraConfig = LoraConfig()


class EvaluationConfig(Section):
    max_new_tokens: int = Field(96, ge=1, le=4096)
    batch_size: int = Field(32, ge=1, le=1024)
    strict: bool = True


class PromotionConfig(Section):
    """The policy a candidate must meet before ``auto`` moves ``champion`` (``manual`` leaves it to a reviewer)."""

    mode: Literal["manual", "auto"] = "manual"
    min_gain: float = Field(0.0, ge=-1, le=1, description="Held-out prompt accuracy must improve by more than this.")
    max_type_regression: float | None = Field(
        0.1, ge=0, le=1, description="No instruction type may lose more accuracy than this (None: unchecked)."
    )
    max_perplexity_increase: float | None = Field(
        0.05, ge=0, description="Relative perplexity rise allowed on the general-text probe (None: unchecked)."
    )
    require_human_approval: bool = Field(False, description="Promote only rounds a human reviewer approved.")


class StorageConfig(Section):
    state_dir: str = Field(".flywheel", description="Runtime state (MLflow DB, model store, Prefect home), git-ignored.")
    dvc_remote: str = Field(".flywheel/dvc-remote", description="DVC remote: a directory or an s3:// URL.")
    mlflow_tracking_uri: str | None = Field(None, description="None: SQLite under state_dir.")
    tag_prefix: str = Field("round-", pattern=r"^[A-Za-z0-9._-]+$")


class FlywheelConfig(Section):
    """One round's recipe. The same object renders as the flow-run form in the Prefect UI."""

    name: str = Field("default", min_length=1)
    seed: int = 0
    model: ModelConfig = ModelConfig()
    prompts: PromptsConfig = PromptsConfig()
    generation: GenerationConfig = GenerationConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    quality: QualityConfig = QualityConfig()
    review: ReviewConfig = ReviewConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _combinations(self) -> FlywheelConfig:
        if self.training.method == "dpo" and self.generation.samples_per_prompt < 2:
            raise ValueError(
                "training.method 'dpo' needs generation.samples_per_prompt >= 2 (a pair needs two samples)"
            )
        if self.training.method == "dpo" and self.feedback.min_score_gap >= 1 and self.feedback.chosen_must_pass:
            raise ValueError("feedback.min_score_gap must be < 1: no pair can beat a gap of 1")
        if self.promotion.require_human_approval and self.promotion.mode == "auto" and self.review.mode == "auto":
            raise ValueError(
                "promotion.require_human_approval needs review.mode 'required': an automatic review never qualifies"
            )
        if self.training.precision == "bf16" and self.training.device == "cpu" and self.training.lora.enabled:
            raise ValueError("training.precision 'bf16' with LoRA is not supported on device 'cpu'; use fp32")
        return self

    def config_hash(self) -> str:
        """Stable hash of the recipe's content, recorded next to every artifact it produces."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""


def _format_validation_error(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in item and item["type"] != "missing" and not isinstance(item["input"], dict):
            message = f"{message} (got {item['input']!r})"
        problems.append(f"{field}: {message}")
    return f"{source}: invalid config: " + "; ".join(problems)


def parse_config(data: object, source: str = "<config>") -> FlywheelConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(data).__name__}")
    try:
        return FlywheelConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def load_config(path: str | Path, base_dir: Path | None = None) -> FlywheelConfig:
    """Load a YAML recipe and check the files it points at, before any work happens."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    config = parse_config(data, str(path))
    check_paths(config, str(path), base_dir or Path.cwd())
    return config


def check_paths(config: FlywheelConfig, source: str, base_dir: Path) -> None:
    """Files a recipe names must exist now, not an hour into a round."""
    from flywheel.prompts import SUPPORTED_SUFFIXES

    if config.prompts.source != "builtin":
        prompt_file = resolve(config.prompts.source, base_dir)
        if not prompt_file.is_file():
            raise ConfigError(f"{source}: prompts.source: file not found: {prompt_file}")
        if prompt_file.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ConfigError(
                f"{source}: prompts.source: unsupported file type {prompt_file.suffix!r} "
                "(allowed: .jsonl, .csv, .parquet)"
            )
    base = config.model.base
    if not base.startswith(BUILTIN_PREFIX) and _looks_like_path(base):
        model_dir = resolve(base, base_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"{source}: model.base: model folder not found: {model_dir}")


def _looks_like_path(value: str) -> bool:
    # A hub id is 'org/name'; anything absolute, relative-dotted or existing on disk is a path.
    return value.startswith(("/", ".", "~")) or Path(value).expanduser().exists() or value.count("/") != 1


def resolve(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)

