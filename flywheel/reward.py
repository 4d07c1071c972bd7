"""Explicit reward and online RL: a reward model trained on the rounds' preference pairs, and GRPO with TRL.

Two axes of the alignment survey meet here:

* explicit reward (``train_reward_model``, ``RewardModelJudge``): a sequence-classification head (one output, the
  reward) on the policy's weights, trained with TRL's ``RewardTrainer`` (Bradley-Terry loss) on the preference pairs
  the rounds accumulated; human-reviewed pairs count more (their rows carry ``weight``). The trained model is a
  judge like any other: ``score = sigmoid(reward)``, ``passed = reward > threshold``.
* online training (``make_grpo_trainer``): TRL's ``GRPOTrainer`` samples ``num_generations`` completions per prompt
  from the policy being trained and rewards them with the programmatic verifiers (``verifier_reward``) and/or the
  reward model (``reward_model_reward``); no vLLM, generation is the policy's own ``generate``.
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter

from flywheel.config import GrpoConfig, TrainingConfig
from flywheel.judges import JudgeVerdict
from flywheel.prompts import Prompt
from flywheel.training import TrainingError
from flywheel.verifiers import Constraint, verify

Messages = list[dict[str, str]]
RewardFunc = Callable[..., list[float]]


class RewardModelError(RuntimeError):
    """A reward model that cannot be trained or loaded; the single-line message says why."""


class GrpoError(TrainingError):
    """GRPO cannot be set up with these rows or options (a ``TrainingError``, so the training stage reports it)."""


class RewardModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    rows: int  # preference pairs given
    rows_used: int  # training rows after weighting (a weight-w pair counts w times) and the max_length filter
    steps: int
    train_loss: float
    accuracy: float  # share of the given pairs where reward(chosen) > reward(rejected) after training
    seconds: float


# --- the reward model ---------------------------------------------------------------------------------------------

def _conversation(prompt: str, response: str) -> Messages:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def weighted_rows(pairs: list[dict]) -> list[dict]:
    """Each pair ``weight`` times (default 1), in the conversational format the policy's training uses."""
    rows = []
    for index, pair in enumerate(pairs):
        missing = [key for key in ("prompt", "chosen", "rejected") if not isinstance(pair.get(key), str)]
        if missing:
            raise RewardModelError(f"preference pair {index}: {missing[0]!r} must be a string")
        weight = pair.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise RewardModelError(f"preference pair {index}: weight must be an integer >= 1, got {weight!r}")
        row = {
            "prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
        }
        # Repetition rather than a loss weight: RewardTrainer has no per-row weight, and a repeated row is exactly a
        # weight-w term in the mean Bradley-Terry loss of an epoch.
        rows.extend([row] * weight)
    return rows


def _load_classifier(model_dir: Path, num_labels: int | None = None):
    """The folder's weights under a sequence-classification head, with the pad token the head needs."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    from flywheel.models import ModelError, check_model_dir, load_tokenizer, read_metadata, verify_model

    try:
        check_model_dir(Path(model_dir))
        if read_metadata(model_dir) is not None:
            verify_model(Path(model_dir))  # never score or train with weights that differ from what was recorded
        tokenizer = load_tokenizer(model_dir)
        extra = {"num_labels": num_labels} if num_labels is not None else {}
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32, **extra)
    except (ModelError, OSError, ValueError, SafetensorError) as error:  # unreadable folder, config or weights
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RewardModelError(f"reward model {model_dir}: {first}") from None
    # The head scores the last non-pad token; without pad_token_id it refuses batches of more than one sequence.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _rewards(model, tokenizer, conversations: Sequence[Messages], batch_size: int, device: str) -> list[float]:
    """One scalar per conversation, tokenized as ``RewardTrainer`` tokenizes a pair side (the chat template with no
    generation prompt), so the judge scores exactly what was trained."""
    import torch

    out: list[float] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(conversations), batch_size):
        batch = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
                 for c in conversations[start:start + batch_size]]
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
        out.extend(float(v) for v in logits[:, 0].float().cpu())
    return out


def train_reward_model(base_dir: Path, pairs: list[dict], output_dir: Path, config: TrainingConfig, *,
                       seed: int = 0) -> RewardModelInfo:
    """Train a reward model on ``pairs`` (``prompt``, ``chosen``, ``rejected``, optional int ``weight`` >= 1) from
    the policy in ``base_dir`` and save it (model and tokenizer, checksummed) to ``output_dir`` atomically.

    Uses the optimisation settings of ``config`` (epochs, max_steps, learning_rate, batch_size, max_length, device,
    precision, LoRA); ``config.method`` is ignored.
    """
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from flywheel.models import resolve_device, save_model
    from flywheel.training import _precision, checkpointing_argument

    if not pairs:
        raise RewardModelError("no preference pairs to train a reward model on: run a round that builds pairs first")
    rows = weighted_rows(pairs)
    device = resolve_device(config.device)
    precision = _precision(config, device)
    set_seed(seed)  # the new head is drawn at random: seed it for a reproducible reward model
    model, tokenizer = _load_classifier(base_dir, num_labels=1)
    peft_config = None
    if config.lora.enabled:
        from peft import LoraConfig

        # SEQ_CLS makes peft train (and save) the new score head in full next to the adapters.
        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules="all-linear", task_type="SEQ_CLS")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flywheel-reward-") as scratch:
        args = RewardConfig(
            output_dir=scratch, num_train_epochs=config.epochs, max_steps=config.max_steps,
            learning_rate=config.learning_rate, per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, max_length=config.max_length,
            logging_steps=1, save_strategy="no", report_to="none", seed=seed, disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=device == "cpu",
            # RewardConfig defaults bf16 and gradient checkpointing on; take them from the project's config.
            bf16=precision == "bf16", **checkpointing_argument(config.gradient_checkpointing),
            # Keeps rewards near zero, so the judge's default threshold 0 separates better from worse.
            center_rewards_coefficient=0.01,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, peft_config=peft_config)
        used = len(trainer.train_dataset)
        if used == 0:
            raise RewardModelError(f"all {len(pairs)} preference pairs are longer than training.max_length="
                                   f"{config.max_length} tokens: raise max_length")
        result = trainer.train()
    seconds = time.perf_counter() - started
    trained = trainer.model
    if config.lora.enabled:
        trained = trained.merge_and_unload()
    trained = trained.to("cpu").to(torch.float32).eval()
    conversations = [_conversation(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")]
    scores = _rewards(trained, tokenizer, conversations, batch_size=16, device="cpu")
    accuracy = sum(c > r for c, r in zip(scores[::2], scores[1::2])) / len(pairs)
    # save_model stages in a temporary sibling folder and renames it into place (models.replace_dir).
    ref = save_model(trained, tokenizer, Path(output_dir), source="trained:reward_model", base=str(base_dir),
                     pairs=len(pairs))
    return RewardModelInfo(path=ref.path, sha256=ref.sha256, rows=len(pairs), rows_used=used,
                           steps=result.global_step, train_loss=float(result.training_loss), accuracy=accuracy,
                           seconds=seconds)


class RewardModelJudge:
    """A trained reward model as a judge: ``score = sigmoid(reward)``, ``passed = reward > threshold``."""

    name = "reward_model"

    def __init__(self, model_dir: Path, *, threshold: float = 0.0, batch_size: int = 16, device: str = "cpu"):
        if batch_size < 1:
            raise RewardModelError(f"reward model judge: batch_size must be >= 1, got {batch_size}")
        self.source = str(model_dir)
        self.threshold = threshold
        self.batch_size = batch_size
        self.device = device
        model, self.tokenizer = _load_classifier(Path(model_dir))
        if model.config.num_labels != 1:
            raise RewardModelError(f"reward model {model_dir}: not a reward model (the head has "
                                   f"{model.config.num_labels} outputs, not 1)")
        self.model = model.to(device).eval()

    def rewards(self, conversations: Sequence[Messages]) -> list[float]:
        """The raw reward of each conversation (a list of chat messages ending with the answer)."""
        if self.model is None:
            raise RewardModelError(f"reward model {self.source}: the judge was closed")
        return _rewards(self.model, self.tokenizer, conversations, self.batch_size, self.device)

    def judge(self, items: Sequence[tuple[Prompt, str]]) -> list[JudgeVerdict]:
        values = self.rewards([_conversation(prompt.prompt, response) for prompt, response in items])
        verdicts = []
        for reward in values:
            passed = reward > self.threshold
            critique = (f"The reward model gives {reward:.3f}, "
                        f"{'above' if passed else 'not above'} the threshold {self.threshold:g}.")
            verdicts.append(JudgeVerdict(score=1.0 / (1.0 + math.exp(-reward)), passed=passed, critique=critique,
                                         judge=self.name))
        return verdicts

    def close(self) -> None:
        if self.model is not None:
            on_gpu = self.device.startswith("cuda")
            self.model = None
            gc.collect()
            if on_gpu:
                import torch

                torch.cuda.empty_cache()


# --- GRPO reward functions ----------------------------------------------------------------------------------------

_CONSTRAINTS = TypeAdapter(list[Constraint])


def constraints_json(prompt: Prompt) -> str:
    """The ``constraints`` column of a GRPO row for ``prompt`` (what ``verifier_reward`` reads)."""
    return json.dumps(prompt.model_dump(mode="json")["constraints"])


def _text(completion: str | Messages) -> str:
    """A completion's text: GRPO passes strings for plain prompts, message lists for conversational ones."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion if m.get("role", "assistant") == "assistant")


def verifier_reward(strict: bool = True) -> RewardFunc:
    """A GRPO reward function: the share of the row's constraints (column ``constraints``, JSON) each completion
    meets, by ``flywheel.verifiers.verify``."""
    parsed: dict[str, list[Constraint]] = {}  # a group repeats its prompt's constraints num_generations times

    def verifier(prompts: list, completions: list, constraints: list[str], **_: Any) -> list[float]:
        scores = []
        for raw, completion in zip(constraints, completions, strict=True):
            if raw not in parsed:
                parsed[raw] = _CONSTRAINTS.validate_json(raw)
            scores.append(verify(parsed[raw], _text(completion), strict=strict).score)
        return scores

    return verifier


def reward_model_reward(judge: RewardModelJudge) -> RewardFunc:
    """A GRPO reward function: the reward model's raw reward of prompt + completion (GRPO normalizes rewards within
    each group, so the raw value serves as well as its sigmoid and keeps more resolution)."""

    def reward_model(prompts: list, completions: list, **_: Any) -> list[float]:
        conversations = []
        for prompt, completion in zip(prompts, completions, strict=True):
            messages = list(prompt) if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
            answer = list(completion) if not isinstance(completion, str) else [
                {"role": "assistant", "content": completion}]
            conversations.append(messages + answer)
        return judge.rewards(conversations)

    return reward_model


# --- GRPO ---------------------------------------------------------------------------------------------------------

def generation_batch(per_device: int, accumulation: int, num_generations: int, prompts: int) -> tuple[int, int]:
    """(per_device_train_batch_size, generation_batch_size) valid for GRPO on one process.

    GRPO samples a generation batch of whole groups (``num_generations`` completions of one prompt), so it must be a
    multiple of ``num_generations`` as well as of the per-device batch (in completions) it is cut into. TRL's
    default (per_device * accumulation) is kept when it already is one; otherwise it is raised to the least common
    multiple. TRL's sampler drops a trailing part-batch of prompts, so a generation batch needing more prompts than
    there are would train no step: it falls back to lcm(per_device, num_generations) and, if that still needs too
    many, the per-device batch is lowered to the largest divisor of prompts * num_generations that fits.
    """
    size = math.lcm(per_device * accumulation, num_generations)
    if size // num_generations <= prompts:
        return per_device, size
    size = math.lcm(per_device, num_generations)
    if size // num_generations <= prompts:
        return per_device, size
    budget = prompts * num_generations
    per_device = max(d for d in range(1, min(per_device, budget) + 1) if budget % d == 0)
    return per_device, math.lcm(per_device, num_generations)


# common keys GRPOConfig has no field for: max_length bounds prompt + completion here (see make_grpo_trainer).
_NOT_GRPO_FIELDS = ("max_length",)


def make_grpo_trainer(model, tokenizer, rows: list[dict], common: dict, peft_config, callbacks, output_dir: str, *,
                      options: GrpoConfig, max_completion_length: int, temperature: float,
                      reward_model_dir: Path | None = None, strict: bool = True, judge_device: str | None = None):
    """A ready ``GRPOTrainer`` over ``rows`` (``prompt_id``, ``prompt`` text, ``constraints`` JSON).

    ``common``'s ``max_length`` is not a GRPOConfig field: prompts whose chat-formatted tokens plus
    ``max_completion_length`` exceed it are dropped (``len(trainer.train_dataset)`` counts the rest). The per-device
    batch and generation batch are made valid for ``options.num_generations`` (see ``generation_batch``).
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if not rows:
        raise GrpoError("GRPO: no prompts to train on")
    budget = common["max_length"] - max_completion_length
    if budget < 1:
        raise GrpoError(f"GRPO: max_completion_length ({max_completion_length}) leaves no room for a prompt within "
                        f"training.max_length ({common['max_length']}): raise max_length")
    usable = []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        if len(ids) <= budget:
            usable.append({"prompt": messages, "prompt_id": row["prompt_id"], "constraints": row["constraints"]})
    if not usable:
        raise GrpoError(f"all {len(rows)} GRPO prompts are longer than {budget} tokens (training.max_length "
                        f"{common['max_length']} minus {max_completion_length} for the completion): raise max_length")

    reward_funcs: list[RewardFunc] = []
    for name in options.rewards:
        if name == "verifier":
            reward_funcs.append(verifier_reward(strict=strict))
        elif reward_model_dir is None:
            raise GrpoError("GRPO reward 'reward_model' needs a trained reward model, and none was given")
        else:
            device = judge_device or ("cpu" if common.get("use_cpu") else _default_device())
            reward_funcs.append(reward_model_reward(RewardModelJudge(Path(reward_model_dir), device=device)))

    per_device, generation_batch_size = generation_batch(
        common["per_device_train_batch_size"], common["gradient_accumulation_steps"], options.num_generations,
        len(usable))
    settings = {k: v for k, v in common.items() if k not in _NOT_GRPO_FIELDS}
    settings["per_device_train_batch_size"] = per_device
    args = GRPOConfig(
        output_dir=output_dir, num_generations=options.num_generations, max_completion_length=max_completion_length,
        generation_batch_size=generation_batch_size, temperature=temperature, use_vllm=False, **settings,
    )
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=Dataset.from_list(usable),
                       processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = [
    "GrpoError", "RewardModelError", "RewardModelInfo", "RewardModelJudge", "constraints_json", "generation_batch",
    "make_grpo_trainer", "reward_model_reward", "train_reward_model", "verifier_reward", "weighted_rows",
]
