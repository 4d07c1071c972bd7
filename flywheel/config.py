"""The flywheel's one typed configuration object, loaded from YAML recipes in ``configs/``.

Every section forbids unknown keys so a typo fails before any work starts, and errors name the file and the
field. Rounds differ by recipe, never by code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

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
    builtin_count: int = Field(
        256, ge=8, le=20_000,
        description="Prompts synthesized when source is builtin. A larger pool keeps the smaller one's prompts and "
                    "their side of the split (a larger eval_limit then scores a superset of the same held-out "
                    "prompts): 1024 holds out about 256, and scoring 192 of them halves the 95% interval of 48.")
    seed: int = 0
    focus: float = Field(
        0.0, ge=0, le=100,
        description="How far a round's training prompts lean toward the instruction types the latest finished round "
                    "failed and turned into training rows (flywheel/focus.py): a prompt's weight is 1 + focus x its "
                    "types' score, drawn from prompts no earlier round answered. 0: consecutive windows of one "
                    "seeded order, as the first round of a focused recipe also draws.")

    @model_validator(mode="after")
    def _builtin_count_needs_builtin(self) -> PromptsConfig:
        if "builtin_count" in self.model_fields_set and self.source != "builtin":
            raise ValueError(f"builtin_count applies to the builtin source only, not to {self.source!r}")
        return self


def _check_base_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


class EndpointOptions(Section):
    """How to talk to an OpenAI-compatible server. The key itself is never stored in a recipe."""

    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (None: no Authorization header).",
    )
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Per-request timeout.")
    retries: int = Field(2, ge=0, le=10, description="Extra attempts after a timeout, connection error, 5xx or 429.")
    backoff_s: float = Field(1.0, ge=0, le=60, description="First retry waits this long, doubling after.")
    max_concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once.")
    batch_samples: bool = Field(
        True, description="Ask for all samples of a prompt in one request (n); false for servers that answer one "
                          "choice per request (llama.cpp server).",
    )


class EndpointConfig(EndpointOptions):
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(min_length=1, description="Model name the server serves.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_base_url(value)


class GenerationConfig(Section):
    engine: Literal["transformers", "ctranslate2", "vllm", "openai"] = Field(
        "transformers", description="transformers (CPU or GPU), ctranslate2 (CPU), vllm (CUDA GPU, the vllm extra), "
                                    "openai (an OpenAI-compatible server).")
    compute_type: Literal["float32", "int8", "int8_float32", "bfloat16", "float16", "int8_float16"] = Field(
        "float32", description="ctranslate2 only. float32 matches the transformers engine's greedy outputs; "
        "int8 is faster on CPU but changes outputs.",
    )
    threads: int = Field(0, ge=0,
                         description="ctranslate2 only: intra-op threads (0: every core this process can use).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="transformers engine only. auto: bf16 on CUDA, fp32 on CPU. bf16 on a CPU with native "
                            "bf16 (AVX512-BF16 or AMX) generates about 2x faster, with other answers than fp32 "
                            "(rounding), so it is a choice, not the default; refused where the CPU would emulate it.")
    openai: EndpointConfig | None = Field(None, description="The 'openai' engine's server (only with that engine).")
    samples_per_prompt: int = Field(4, ge=1, le=64)
    max_new_tokens: int = Field(96, ge=1, le=4096)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(
        128, ge=1, le=1024,
        description="Sequences decoded together. On 2 CPU cores the default round's 256 samples took 80.7 s at 128, "
                    "89.3 s at 64 and 120.5 s at 32 (bench/README.md): decode multiplies batch-row matrices, which "
                    "run nearer the CPU's matmul rate the more rows they have.")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _engine_endpoint(self) -> GenerationConfig:
        if self.engine == "openai" and self.openai is None:
            raise ValueError("engine 'openai' needs an openai section with base_url and model")
        if self.engine != "openai" and self.openai is not None:
            raise ValueError(f"an openai section is set but engine is {self.engine!r}: set engine: openai or drop it")
        if self.engine != "transformers" and self.precision != "auto":
            raise ValueError(f"precision {self.precision!r} is the transformers engine's (engine is {self.engine!r}; "
                             "ctranslate2 has compute_type)")
        if self.engine != "ctranslate2" and self.compute_type != "float32":
            raise ValueError(
                f"compute_type {self.compute_type!r} needs engine 'ctranslate2' (engine is {self.engine!r})"
            )
        return self


class TeacherConfig(EndpointOptions):
    """The teacher judge: a local model folder, or a model served by an OpenAI-compatible endpoint."""

    model: str = Field(min_length=1, description="A local model folder, or with base_url the served model's name.")
    base_url: str | None = Field(None, description="OpenAI-compatible base URL; None: model is a local folder.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_base_url(value)


class FeedbackConfig(Section):
    judges: list[Literal["verifier", "self", "teacher", "reward_model"]] = Field(
        default_factory=lambda: ["verifier"], min_length=1,
        description="verifier: programmatic checks; self: the policy judges itself; teacher: another model judges; "
                    "reward_model: a reward model trained on the earlier rounds' preference pairs.",
    )
    reward_threshold: float = Field(0.0, description="reward_model judge: a reward above this passes.")
    teacher: TeacherConfig | None = None
    llm_scope: Literal["unverifiable", "all"] = Field(
        "unverifiable", description="Rows the LLM judge decides: those the verifier cannot check, or all.",
    )
    votes: int = Field(1, ge=1, le=15, description="LLM judge samples per row; majority vote.")
    allow_ties: bool = Field(False, description="Allow an even number of votes; a tie gives no verdict.")
    judge_temperature: float = Field(0.7, ge=0, description="Sampling temperature of the votes (with votes > 1).")
    judge_max_new_tokens: int = Field(256, ge=8, le=4096, description="Length of one critique.")
    agreement_sample: int = Field(
        32, ge=0, description="With llm_scope 'unverifiable': verifiable rows also judged by the LLM judge, "
                              "only to report its agreement with the verifier.",
    )
    strict: bool = Field(True, description="Strict verifiers; loose also accepts markdown-stripped variants.")
    chosen_must_pass: bool = Field(
        True, description="A pair's chosen sample must satisfy every constraint; off: any higher score will do."
    )
    min_score_gap: float = Field(0.0, ge=0, le=1, description="Chosen must beat rejected by more than this.")
    sft_min_score: float = Field(1.0, ge=0, le=1, description="Samples at or above this score become SFT rows.")
    sft_max_per_prompt: int | None = Field(
        None, ge=1, description="At most this many of a prompt's accepted samples become SFT rows: the highest "
        "scores, finished answers before cut-off ones, then sample order. A prompt the model already answers well "
        "every time would otherwise give one row per sample, and a promoted model's own answers would crowd out "
        "the rows that teach it something (repairs). null: every distinct accepted sample.")
    echo_ngram: int | None = Field(
        None, ge=2, le=32, description="The verifier fails (score 0) an answer that copies this many consecutive "
        "words of one of its instructions, or an instruction's example (\"* This is a point\", \"<<my title>>\"): "
        "it meets the check by echoing the prompt, and trained on it teaches the echo. Repairs and hindsight rows "
        "(strategy.repair.augment_per_row) that echo are not accepted either. Evaluation is unaffected. null: off.")

    @model_validator(mode="after")
    def _judges(self) -> FeedbackConfig:
        if len(set(self.judges)) != len(self.judges):
            raise ValueError(f"judges lists a judge twice: {self.judges}")
        second = [j for j in self.judges if j != "verifier"]
        if len(second) > 1:
            raise ValueError(f"judges: use one judge besides the verifier ('self', 'teacher' or 'reward_model'), "
                             f"not {second}")
        if "teacher" in self.judges and self.teacher is None:
            raise ValueError("judges has 'teacher' but no teacher section (model folder, or base_url and model)")
        if "teacher" not in self.judges and self.teacher is not None:
            raise ValueError("a teacher section is set but 'teacher' is not in judges")
        if "verifier" not in self.judges and self.llm_scope != "all":
            raise ValueError("judges without 'verifier' leave every row to the LLM judge: set llm_scope: all")
        if self.votes % 2 == 0 and not self.allow_ties:
            raise ValueError(f"votes ({self.votes}) is even and a tie gives no verdict: use an odd number "
                             "or set allow_ties: true")
        if self.votes > 1 and self.judge_temperature == 0:
            raise ValueError(f"votes ({self.votes}) with judge_temperature 0 repeats one greedy vote: "
                             "raise judge_temperature or use votes: 1")
        return self


class QualityConfig(Section):
    """The quality gate's bounds (``flywheel/quality.py``): rows failing a row-level check are quarantined; a share
    over its maximum, or more failed rows than ``max_failed_fraction``, stops the round. The defaults quarantine bad
    rows without stopping a normal default round (SmolLM2-135M at temperature 0.8 and 96 new tokens: about 60% of
    its answers reach the token limit, about 2% repeat themselves, refusals are rare)."""

    min_chars: int = Field(1, ge=0, description="Fewest characters in a response, chosen, rejected or completion.")
    max_chars: int = Field(4000, ge=1, description="Most characters in a response, chosen, rejected or completion.")
    min_tokens: int = Field(1, ge=0, description="Fewest tokens, counted as words and punctuation marks (about 0.95 "
                            "of SmolLM2's BPE count on its own answers).")
    max_tokens: int = Field(1024, ge=1, description="Most tokens (same approximate count).")
    language: str | None = Field(
        "en", pattern=r"^[a-z]{2}$", description="Language (ISO 639-1, as langid names it) a response must be in "
        "unless its prompt asks for another; responses too short to tell pass. null: unchecked.")
    language_min_letters: int = Field(40, ge=1, description="Responses with fewer letters pass the language check.")
    repetition_ngram: int = Field(4, ge=1, le=64, description="Word n-gram size of the degenerate-repetition check.")
    repetition_max_repeats: int = Field(
        4, ge=1, description="A response in which one word n-gram occurs more often than this is degenerate.")
    decontamination_ngram: int = Field(
        25, ge=1, description="A training prompt sharing this many consecutive words with an evaluation prompt is "
        "quarantined (exact copies always are). Above the ~13 usual for free text: the builtin prompts share "
        "instruction templates up to about 20 words; lower it for a prompt file of free-form prompts.")
    quarantine_truncated: bool = Field(
        False, description="Quarantine pairs whose chosen answer, and SFT rows whose completion, hit the token "
        "limit. Off by default: the default model truncates most answers at 96 tokens, and quarantining them would "
        "halve the training data; the share is bounded by max_truncated_share either way.")
    quarantine_cut_off_limits: bool = Field(
        True, description="Quarantine SFT rows the token limit cut off (not ended) whose prompt sets an exact count "
        "or an upper limit (bullets, numbered items, paragraphs, sections, at most N words or sentences): the cut "
        "has not shown where the answer stops, and trained as an open target it teaches the model to write past the "
        "count (bench/README.md).")
    max_refusal_share: float = Field(0.1, ge=0, le=1, description="The round stops when a larger share of samples "
                                     "are refusals (\"I can't help with that\"); the default round has about 0.")
    max_repetition_share: float = Field(0.2, ge=0, le=1, description="The round stops when a larger share of samples "
                                        "are degenerate repetitions; the default round has about 0.02.")
    max_truncated_share: float = Field(0.9, ge=0, le=1, description="The round stops when a larger share of samples "
                                       "hit the token limit (generation.max_new_tokens); the default round has about 0.6.")
    max_failed_fraction: float = Field(0.2, ge=0, le=1, description="The round stops when more rows fail.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> QualityConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self


class ReviewConfig(Section):
    mode: Literal["auto", "required"] = "auto"
    sample_size: int = Field(8, ge=1, description="Rows shown to the reviewer, stratified by instruction type and verdict.")
    timeout_s: int = Field(24 * 3600, ge=1, description="How long a required review waits for a decision.")
    on_timeout: Literal["reject", "approve_if_checks_passed"] = Field(
        "reject", description="Decision recorded (reviewer 'timeout') when nobody decided within timeout_s; "
                              "approve_if_checks_passed approves only when no quality expectation failed.")


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)


class TrainingConfig(Section):
    method: Literal["dpo", "sft", "sami", "grpo"] = Field(
        "dpo", description="dpo: preference pairs; sft: accepted answers; sami: the SAMI contrastive loss over "
                           "constitutions (strategy sami); grpo: online GRPO on the round's prompts (strategy grpo).")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: as many as epochs need.")
    max_rows: int | None = Field(
        None, ge=1, description="At most this many training rows a round: a sample seeded by the recipe's seed and "
                                "the round, the same on every attempt. A promoted model passes more often and yields "
                                "more rows, so this bounds a round's training time; the dataset keeps every row, and "
                                "the round record's trained rows against its clean rows show the cut (None: all).")
    carry_refused_rounds: int = Field(
        0, ge=0, description="Also train on the clean rows of up to this many of the latest earlier rounds that ran "
                             "this recipe from the same champion and whose candidates were refused. Their rows were "
                             "made by the model this round trains, so they are still its own data; without them a "
                             "retry from the same champion starts again from one round's rows. They are read from "
                             "data/rounds/ (covered by this round's DVC hash), and the round record and the "
                             "version's tags name their rounds. max_rows bounds the union. 0: this round's rows.")
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(384, ge=16)
    beta: float = Field(0.1, gt=0, description="DPO temperature.")
    sft_weight: float = Field(
        0.0, ge=0, description="DPO only: weight of an SFT (negative log-likelihood) term on the chosen answers added "
                               "to the preference loss (RPO); it keeps the chosen answers likely instead of only "
                               "apart from the rejected ones. 0: plain DPO.")
    kl_weight: float = Field(
        0.0, ge=0, description="SFT only: weight of a KL(reference || policy) term, the reference being the model "
                               "training starts from. Training on the model's own samples sharpens it onto them "
                               "(general-text perplexity rises round after round); the term holds its language "
                               "modelling in place. Costs one more forward pass per step. 0: plain SFT.")
    kl_tokens: Literal["prompt", "answer"] = Field(
        "prompt", description="Where the KL term applies. prompt: the request tokens, which SFT does not train on: "
                              "an anchor of ordinary text that leaves the answers free to change; answer: the answer "
                              "tokens, against the very change the targets ask for (bench/README.md measured it "
                              "cancelling the gain).")
    open_cut_off_targets: bool = Field(
        False, description="SFT only: a target the token limit cut off (its row's `ended` is false: an accepted "
                           "sample that did not finish, or a repair trimmed to its last sentence with nothing "
                           "appended at its end) is trained without its end of turn, so the model learns its "
                           "content, not to stop where the limit stopped it. false: every target ends its turn.")
    extrapolation: float = Field(
        1.0, gt=0, le=4, description="The saved weights are start + extrapolation x (trained - start), start being "
                                     "the weights training began from: above 1 goes further along the direction "
                                     "training moved (model extrapolation, ExPO), below 1 stays between the two "
                                     "(weight interpolation). Costs nothing at training time; drift (the probe's "
                                     "perplexity) grows with it. 1: the trained weights.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a capable GPU, else fp32. bf16 (mixed precision) on a CPU needs native "
                            "bf16 (AVX512-BF16 or AMX).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a quarter more compute. "
                           "TRL turns it on by default; a small model on a CPU is faster without.",
    )
    checkpoint_steps: int = Field(
        5, ge=0, description="Save a resumable checkpoint every N optimizer steps (0: never); a killed round resumes "
                             "training from the last complete one.",
    )
    lora: LoraConfig = LoraConfig()
    processes: int = Field(
        1, ge=1, le=64, description="Training processes: more than 1 runs `accelerate launch` as a subprocess, one "
                                    "process per GPU (on CPU: gloo processes, for testing the launch).")
    accelerate: Literal["ddp"] = Field(
        "ddp", description="The accelerate config in infra/accelerate/ used with processes > 1. FSDP and DeepSpeed "
                           "ZeRO-3 shard the weights, which the training stage does not gather yet.")

    @model_validator(mode="after")
    def _launchable(self) -> TrainingConfig:
        if self.sft_weight > 0 and self.method != "dpo":
            raise ValueError(f"sft_weight adds an SFT term to the DPO loss; method {self.method!r} has none to add "
                             "it to (set it to 0)")
        if self.kl_weight > 0 and self.method != "sft":
            raise ValueError(f"kl_weight anchors SFT to its starting model; method {self.method!r} does not take it "
                             "(DPO is anchored by its own reference: set it to 0)")
        if self.open_cut_off_targets and self.method != "sft":
            raise ValueError(f"open_cut_off_targets applies to SFT targets; method {self.method!r} has none")
        if self.carry_refused_rounds and self.method == "grpo":
            raise ValueError("carry_refused_rounds carries training rows; method 'grpo' trains on the round's prompts "
                             "online (set it to 0)")
        if self.processes > 1 and self.method == "grpo":
            raise ValueError("processes > 1 is not supported with method 'grpo' yet (its reward settings do not "
                             "travel to the launched processes)")
        return self


DEFAULT_PRINCIPLES = (
    "Follow every instruction in the request exactly, including its format and length.",
    "Answer the request directly and stay on its topic.",
    "Be concise: say what is needed and nothing more.",
    "Use plain, correct English unless the request asks for another language.",
)


class BestOfNConfig(Section):
    """Rejection sampling: per prompt, the best sample (by the judges) is chosen, the worst rejected."""


class RepairConfig(Section):
    """Verifier-guided repair (``flywheel.repair``): failed answers get the mechanical fixes of the instructions
    they break (case, commas, digits, opening and closing phrases, last words, postscripts, missing keywords and
    placeholders, list, section, paragraph and sentence counts, highlights, titles, JSON, ...); a repair the
    verifier scores higher becomes the pair (repaired, original), and an SFT target when it passes. Needs the
    verifier among the judges."""

    types: list[str] | None = Field(None, description="Instruction types to repair; None: every type with a fixer.")
    trim_unfinished: bool = Field(True, description="A repaired answer is also cut back to its last complete "
                                                    "sentence, so it never teaches stopping mid-sentence.")
    max_kept_words: int | None = Field(
        None, ge=8, description="A repaired answer that fails an instruction on how it ends (postscript, closing "
                                "phrase or question, last word, quotation marks, JSON) also keeps only its leading "
                                "whole sentences within this many words (at least its first) before the fixes add "
                                "theirs, so its turn ends inside the token limit, ending included, and the policy "
                                "learns to leave room for the ending it is asked for; where that breaks an "
                                "instruction (a minimum length) the unshortened repair is used. Shortening every "
                                "repair taught short answers everywhere: minimum lengths lost 0.38 (bench/README.md). "
                                "Hindsight rows (`augment_per_row`) are not shortened. None: only a cut-off last "
                                "sentence goes.")
    augment_per_row: int = Field(
        0, ge=0, le=4, description="Hindsight instructions (flywheel.repair.augment_rows): each accepted answer is "
                                   "also taught under its prompt plus this many more instructions of `augment_types`, "
                                   "one per row, that it meets as it is or once repaired. 0: off.")
    augment_types: list[str] | None = Field(
        None, description="The instruction types augmentation may add, a subset of `types` (their fixes make the "
                          "answers meet them); None: every type of `types`.")

    contrast_types: list[str] | None = Field(
        None, description="Minimal pairs for the instruction: an accepted repair that applied the fix of one of these "
                          "types is also taught under its prompt without that instruction (its sentence taken out of "
                          "the prompt), answered with the repair of the other instructions alone, from the same "
                          "sampled answer. Trained only on the repaired rows, the policy puts the form on answers "
                          "nobody asked it of (quotation marks, lower case, postscripts); the pair shows it that the "
                          "instruction asks for the form, not the task. A subset of `types`; None: off.")

    plain_anchors: int = Field(
        0, ge=0, le=256, description="KL anchors on plain requests: up to this many of the round's tasks, each asked "
                                     "alone (the prompt's task sentence without its instructions) with one of its "
                                     "sampled answers, are added to the SFT rows as anchors: no loss on their answers, "
                                     "only the KL term to the starting model (training.kl_weight) over their request "
                                     "and answer tokens. The repairs teach forms (quotation marks, lower case, titles, "
                                     "postscripts) that the policy then puts on answers nobody asked them of; the "
                                     "anchors hold what it does with a request that asks nothing. They come on top "
                                     "of training.max_rows. Needs method sft with kl_weight > 0 on kl_tokens prompt, "
                                     "and synthesized prompts (their task sentence). Measured on one seed: the leak "
                                     "halved, round 1 +4.5 points against +2.0, but three rounds served +0.0 against "
                                     "+6.3 (bench/README.md). 0: off.")

    @field_validator("types", "augment_types", "contrast_types")
    @classmethod
    def _known_types(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return value
        from flywheel.repair import FIXERS

        unknown = [name for name in value if name not in FIXERS]
        if unknown:
            raise ValueError(f"no repair for instruction type {unknown[0]!r}; types with one: {', '.join(FIXERS)}")
        if not value:
            raise ValueError(f"an empty list: leave {info.field_name} out for every type with a fixer")
        return value

    def _not_repaired(self, names: list[str] | None) -> list[str]:
        return [name for name in names or [] if self.types is not None and name not in self.types]

    @model_validator(mode="after")
    def _contrast_types_are_repaired(self):
        outside = self._not_repaired(self.contrast_types)
        if outside:
            raise ValueError(f"contrast_types {outside} are not among types {self.types}: a contrast row comes from "
                             "a repair that applied the fix of its type")
        return self

    @model_validator(mode="after")
    def _augment_types_are_repaired(self):
        if self.augment_types is None:
            return self
        if not self.augment_per_row:
            raise ValueError("augment_types is set but augment_per_row is 0: augmentation is off")
        outside = self._not_repaired(self.augment_types)
        if outside:
            raise ValueError(f"augment_types {outside} are not among types {self.types}: augmentation meets an "
                             "added instruction with the fixes of `types`")
        return self


class SelfRefineConfig(Section):
    """SELF: the policy critiques its own failed answers in words and rewrites them."""

    refinements: int = Field(1, ge=1, le=8, description="Rewrites sampled per failed answer.")
    max_answers: int = Field(64, ge=1, description="Most failed answers refined in one round (worst-scored first).")
    critique_max_new_tokens: int = Field(96, ge=8, le=4096)
    refine_max_new_tokens: int | None = Field(None, ge=1, le=4096, description="None: generation.max_new_tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of critiques and rewrites.")
    meta_skill: bool = Field(True, description="Keep critique and rewrite examples as SFT rows, so the model also "
                                               "learns to critique and refine.")


class SparConfig(Section):
    """SPaR: tree search over minimal refinements of a failed answer; pairs (refined, original) for DPO."""

    breadth: int = Field(3, ge=1, le=16, description="Refinements sampled from each node (branching factor).")
    keep: int = Field(2, ge=1, le=16, description="Best nodes kept at each depth.")
    depth: int = Field(3, ge=1, le=8, description="Most refinement steps from the original answer.")
    judge_samples: int = Field(5, ge=1, le=15, description="Judge samples per node; value = share that pass "
                                                            "(a deterministic judge is asked once).")
    threshold: float = Field(0.5, ge=0, lt=1, description="Search stops at a node whose value exceeds this.")
    max_answers: int = Field(64, ge=1, description="Most failed answers searched in one round.")
    refine_max_new_tokens: int | None = Field(None, ge=1, le=4096, description="None: generation.max_new_tokens.")
    temperature: float = Field(0.8, ge=0)
    refiner: Literal["policy", "trained"] = Field(
        "policy", description="Who refines: 'policy' (the champion itself; its refiner rows stay in the SFT table) "
                              "or 'trained' (a separate model, registered as '<model.registered_name>-refiner', "
                              "that starts from the policy's weights and is trained with SFT on each round's "
                              "clean refiner rows in the train stage; it has no held-out evaluation).")
    refiner_learning_rate: float | None = Field(None, gt=0, description="The refiner's SFT learning rate "
                                                                        "(refiner: trained). None: "
                                                                        "training.learning_rate.")
    refiner_max_steps: int | None = Field(None, ge=-1, description="The refiner's SFT steps (refiner: trained; -1: "
                                                                   "training.epochs over its rows). None: "
                                                                   "training.max_steps.")


class SamiConfig(Section):
    """SAMI: constitutions (principles and their antitheses) and a mutual-information contrastive loss."""

    writer: str = Field("self", description="Who writes extra principles: 'self' (the policy), 'none' (only the "
                                            "listed ones), or a local model folder.")
    principles: list[str] = Field(default_factory=lambda: list(DEFAULT_PRINCIPLES), min_length=1,
                                  description="Seed principles; the writer adds to them and writes antitheses.")
    written_principles: int = Field(4, ge=0, le=64, description="Extra principles the writer is asked for.")
    constitutions_per_prompt: int = Field(4, ge=2, le=16, description="Constitutions sampled per prompt: the "
                                                                      "side of the contrastive matrix.")
    principles_per_constitution: int = Field(2, ge=1, le=8)
    writer_max_new_tokens: int = Field(64, ge=8, le=1024)


class DistillConfig(Section):
    """Weak-to-strong distillation: the student writes a guideline, the teacher answers with it, the student learns
    the teacher's answers (SFT)."""

    teacher: TeacherConfig = Field(description="A local model folder, or base_url and the served model's name.")
    guideline_max_new_tokens: int = Field(48, ge=1, le=1024)
    answer_max_new_tokens: int | None = Field(None, ge=1, le=4096, description="None: generation.max_new_tokens.")
    require_pass: bool = Field(True, description="Only teacher answers the judges accept become SFT rows.")


class GrpoConfig(Section):
    """Online GRPO with TRL: the verifiers (and the reward model, if trained) are the reward functions."""

    rewards: list[Literal["verifier", "reward_model"]] = Field(default_factory=lambda: ["verifier"], min_length=1)
    num_generations: int = Field(4, ge=2, le=64, description="Completions per prompt in a GRPO group.")
    max_completion_length: int | None = Field(None, ge=1, le=4096, description="None: generation.max_new_tokens.")


class StrategyConfig(Section):
    """How a round turns the policy's own answers into training data; each strategy has its own section."""

    name: Literal["best_of_n", "repair", "self_refine", "spar", "sami", "distill", "grpo"] = "best_of_n"
    best_of_n: BestOfNConfig = BestOfNConfig()
    repair: RepairConfig = RepairConfig()
    self_refine: SelfRefineConfig = SelfRefineConfig()
    spar: SparConfig = SparConfig()
    sami: SamiConfig = SamiConfig()
    distill: DistillConfig | None = Field(None, description="Required with name 'distill' (it names the teacher).")
    grpo: GrpoConfig = GrpoConfig()

    @model_validator(mode="after")
    def _own_section(self) -> StrategyConfig:
        if self.name == "distill" and self.distill is None:
            raise ValueError("strategy 'distill' needs a distill section with its teacher")
        return self

    def options(self) -> Section | None:
        """The chosen strategy's own section."""
        return getattr(self, self.name)


# The training methods a strategy's data can feed.
STRATEGY_METHODS: dict[str, tuple[str, ...]] = {
    "best_of_n": ("dpo", "sft"),
    "repair": ("dpo", "sft"),
    "self_refine": ("dpo", "sft"),
    "spar": ("dpo", "sft"),
    "sami": ("sami",),
    "distill": ("sft",),
    "grpo": ("grpo",),
}


class EvaluationConfig(Section):
    max_new_tokens: int = Field(96, ge=1, le=4096)
    batch_size: int = Field(32, ge=1, le=1024)
    strict: bool = True
    open_ended: int = Field(
        0, ge=0, le=10_000, description="Open-ended prompts (no verifiable constraints) both models answer each round; "
                                        "an LLM judge compares the two answers in both orders: the open-ended win "
                                        "rate (reported, not a promotion condition). 0: off.")
    open_ended_prompts: str = Field(
        "builtin", min_length=1, description="builtin (40 plain requests), or a JSONL file of {id, prompt} lines.")
    open_ended_judge: Literal["self", "teacher"] = Field(
        "self", description="Who compares the answers: the champion (self) or the recipe's feedback.teacher.")


class PromotionConfig(Section):
    """The policy a candidate must meet before ``auto`` moves ``champion`` (``manual`` leaves it to a reviewer)."""

    mode: Literal["manual", "auto"] = "manual"
    min_gain: float = Field(0.0, ge=-1, le=1,
                            description="Held-out accuracy (gain_metric) must improve by more than this.")
    gain_metric: Literal["prompt", "instruction"] = Field(
        "prompt", description="Which held-out accuracy min_gain applies to: prompt (every instruction of a prompt "
                              "met, IFEval's prompt level) or instruction (share of instructions met). The other is "
                              "reported, not checked: on the 48-prompt set the two can move apart by several points.")
    gain_alpha: float | None = Field(
        None, gt=0, lt=1, description="With it, the gain must also be significant: one-sided exact sign test over the "
                                      "held-out prompts whose result changed (better vs worse), p below this. On 48 "
                                      "prompts a few points of gain is within noise (None: min_gain alone).")
    max_type_regression: float | None = Field(
        0.1, ge=0, le=1, description="No instruction type may lose more accuracy than this (None: unchecked)."
    )
    min_type_support: int = Field(
        10, ge=0, description="Types with fewer held-out instructions than this are reported, not checked for "
                              "regression: on 2-6 items one flipped answer is a 0.17-0.5 drop, noise that would "
                              "refuse every candidate and stop the rounds from compounding (0: check every type).",
    )
    type_regression_alpha: float | None = Field(
        None, gt=0, lt=1, description="With it, a type's drop beyond max_type_regression refuses the candidate only "
                                      "if significant: one-sided sign test on the type's flipped instructions (lost "
                                      "vs gained) with p below this. Tells a consistent regression from one "
                                      "flipped answer at any support (None: the threshold alone).")
    max_perplexity_increase: float | None = Field(
        0.05, ge=0, description="Relative perplexity rise allowed on the general-text probe against the champion "
                                "(None: unchecked). A bound per round: rounds that each stay under it can add up.",
    )
    max_perplexity_increase_vs_base: float | None = Field(
        None, ge=0, description="Relative perplexity rise allowed on the probe against the lineage's base model (the "
                                "version the champion descends from that was registered on first use): a budget for "
                                "the drift of all promoted rounds together (None: unchecked).",
    )
    require_human_approval: bool = Field(False, description="Promote only rounds a human reviewer approved.")


class StorageConfig(Section):
    state_dir: str = Field(".flywheel", description="Runtime state (MLflow DB, model store, Prefect home), git-ignored.")
    dvc_remote: str = Field(".flywheel/dvc-remote", description="DVC remote: a directory or an s3:// URL.")
    mlflow_tracking_uri: str | None = Field(None, description="None: SQLite under state_dir.")
    tag_prefix: str = Field("round-", pattern=r"^[A-Za-z0-9._-]+$")
    prune_after_round: Literal["off", "copies", "refused"] = Field(
        "off", description="After each round, as `flywheel prune` does: 'copies' removes the copies of weights the "
                           "registry holds (finished rounds' training folders, store copies no alias uses); "
                           "'refused' also deletes refused candidates' registered weights (their versions stay).",
    )
    keep_refused: int = Field(0, ge=0, description="With prune_after_round 'refused': the newest refused candidates "
                                                   "whose weights stay.")

    @field_validator("prune_after_round", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` as false: `prune_after_round: off` means the mode, not a boolean.
        return "off" if value is False else value

    @model_validator(mode="after")
    def _keep_refused_needs_refused(self) -> StorageConfig:
        if self.keep_refused and self.prune_after_round != "refused":
            raise ValueError(f"keep_refused: {self.keep_refused} applies only with prune_after_round 'refused' "
                             f"(got {self.prune_after_round!r})")
        return self


# Stages `deployment.stage_pools` can send to a work pool of their own (flows/stages.py).
RoutableStage = Literal["generate", "train", "evaluate"]


class DeploymentConfig(Section):
    """How `flywheel deploy` / `flywheel serve` schedule rounds on a Prefect server."""

    cron: str = Field("0 2 * * *", description="When the scheduled round runs (cron; default nightly at 02:00).")
    timezone: str = Field("UTC", description="Time zone the cron expression is read in.")
    schedule_active: bool = Field(True, description="False: the deployment is registered with its schedule paused.")
    work_pool: str = Field("flywheel", min_length=1, description="Work pool `flywheel deploy` registers with.")
    round_slot_timeout_s: int | None = Field(
        None, ge=1, description="How long a round waits for the model's round slot (None: as long as it takes).",
    )
    stage_pools: dict[RoutableStage, str] = Field(
        default_factory=dict,
        description="Work pool per stage run as its own flow run (e.g. {train: flywheel-gpu}); a stage not listed "
                    "runs inside the round's flow run. The workspace must be on a volume every pool's workers see.",
    )

    @field_validator("stage_pools")
    @classmethod
    def _named_pools(cls, value: dict[str, str]) -> dict[str, str]:
        for stage, pool in value.items():
            if not pool.strip():
                raise ValueError(f"{stage}: work pool name is empty")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from datetime import datetime

        try:
            from cronsim import CronSim, CronSimError
        except ImportError:  # cronsim comes with Prefect; without it the server checks the expression
            return value
        try:
            CronSim(value, datetime.now())
        except CronSimError as error:
            raise ValueError(f"invalid cron expression {value!r} ({error})") from None
        return value


class FlywheelConfig(Section):
    """One round's recipe. The same object renders as the flow-run form in the Prefect UI.

    The field defaults are a conservative baseline (best-of-n with DPO, manual promotion, nothing pruned), which is
    what a flow called without a ``config`` runs. The measured default recipe is ``configs/default.yaml`` (repair
    with SFT, automatic promotion within a drift budget): ``flywheel run`` and the deployments load it unless told
    otherwise. The two carry different names, so the ``flywheel.recipe`` tag tells their models apart.
    """

    name: str = Field("baseline", min_length=1, description="The recipe's name: the flywheel.recipe tag of its "
                      "models and the name of its deployments.")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    prompts: PromptsConfig = PromptsConfig()
    generation: GenerationConfig = GenerationConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    strategy: StrategyConfig = StrategyConfig()
    quality: QualityConfig = QualityConfig()
    review: ReviewConfig = ReviewConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    storage: StorageConfig = StorageConfig()
    deployment: DeploymentConfig = DeploymentConfig()

    @model_validator(mode="after")
    def _combinations(self) -> FlywheelConfig:
        allowed = STRATEGY_METHODS[self.strategy.name]
        if self.training.method not in allowed:
            raise ValueError(f"strategy {self.strategy.name!r} trains with training.method "
                             f"{' or '.join(repr(m) for m in allowed)}, not {self.training.method!r}")
        if self.strategy.name == "repair" and "verifier" not in self.feedback.judges:
            raise ValueError("strategy 'repair' needs 'verifier' in feedback.judges: the verifier decides which "
                             "repairs count")
        if self.strategy.name == "repair" and self.strategy.repair.plain_anchors and (
                self.training.method != "sft" or self.training.kl_weight <= 0 or self.training.kl_tokens != "prompt"):
            raise ValueError("strategy.repair.plain_anchors needs training.method 'sft' with training.kl_weight > 0 "
                             "and kl_tokens 'prompt': an anchor row has no loss of its own, only the KL term on the "
                             "tokens not trained on")
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
        if self.evaluation.open_ended_judge == "teacher" and self.feedback.teacher is None:
            raise ValueError("evaluation.open_ended_judge 'teacher' needs a feedback.teacher section "
                             "(and 'teacher' in feedback.judges)")
        return self

    def config_hash(self) -> str:
        """Stable hash of the recipe's content, recorded next to every artifact it produces."""
        # Scheduling does not change what a round produces, so it stays out of the hash.
        recipe = self.model_dump(mode="json", exclude={"deployment"})
        canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""


def _format_validation_error(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
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
    if config.evaluation.open_ended_prompts != "builtin":
        open_file = resolve(config.evaluation.open_ended_prompts, base_dir)
        if not open_file.is_file():
            raise ConfigError(f"{source}: evaluation.open_ended_prompts: file not found: {open_file}")
    base = config.model.base
    if not base.startswith(BUILTIN_PREFIX) and _looks_like_path(base):
        model_dir = resolve(base, base_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"{source}: model.base: model folder not found: {model_dir}")
    teachers = {"feedback.teacher.model": config.feedback.teacher}
    if config.strategy.distill is not None:
        teachers["strategy.distill.teacher.model"] = config.strategy.distill.teacher
    if config.strategy.sami.writer not in ("self", "none"):
        writer_dir = resolve(config.strategy.sami.writer, base_dir)
        if not writer_dir.is_dir():
            raise ConfigError(f"{source}: strategy.sami.writer: model folder not found: {writer_dir}")
    for field, teacher in teachers.items():
        if teacher is None or teacher.base_url is not None:
            continue
        if teacher.model.startswith(BUILTIN_PREFIX) and field.startswith("strategy."):
            continue  # provisioned like the base model (the judge's teacher takes a folder or an endpoint)
        if _looks_like_path(teacher.model):
            teacher_dir = resolve(teacher.model, base_dir)
            if not teacher_dir.is_dir():
                raise ConfigError(f"{source}: {field}: model folder not found: {teacher_dir}")


def _looks_like_path(value: str) -> bool:
    # A hub id is 'org/name'; anything absolute, relative-dotted or existing on disk is a path.
    return value.startswith(("/", ".", "~")) or Path(value).expanduser().exists() or value.count("/") != 1


def resolve(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)

