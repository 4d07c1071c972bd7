"""Fine-tuning with TRL: DPO on preference pairs or SFT on accepted samples, full or LoRA, CPU or GPU."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flywheel.config import TrainingConfig
from flywheel.models import ModelRef, atomic_write_text, read_metadata, resolve_device, save_model


class TrainingError(RuntimeError):
    pass


class TrainedModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Where the round trained into. Once the version is registered the registry holds the weights, and with
    # storage.prune_after_round this folder is removed after the round's record is written (flywheel.storage):
    # look a model up by its registered version and sha256, not by this path.
    path: str
    sha256: str
    method: str
    rows: int
    rows_used: int  # after the trainer drops rows whose prompt alone exceeds max_length
    steps: int
    train_loss: float
    seconds: float
    device: str
    precision: str
    changed_parameters: float  # share of parameter tensors whose values moved
    refiner: RefinerUpdate | None = None  # SPaR with a trained refiner: what the round did to it
    carried_rounds: list[int] = []  # earlier refused rounds whose rows it also trained on (carry_refused_rounds)


class RefinerUpdate(BaseModel):
    """The SPaR refiner in one round (``strategy.spar.refiner: trained``): the version that refined the round's
    answers and, when the round had refiner rows, the version trained on them (its new ``champion``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str  # its registered model: <model.registered_name>-refiner
    used_version: str  # the refiner version the round's tree search ran
    version: str  # the refiner's champion after the round: the new version, or used_version when not trained
    trained: TrainedModel | None  # None: nothing trained in this attempt (see reason)
    reason: str


TrainedModel.model_rebuild()


MetricSink = Callable[[dict[str, float], int], None]


def _precision(config: TrainingConfig, device: str) -> str:
    if config.precision != "auto":
        if config.precision == "bf16" and device == "cpu":
            from flywheel.generation import cpu_has_native_bf16

            # Without AVX512-BF16/AMX torch emulates bf16, far slower than fp32: make the user choose knowingly.
            if not cpu_has_native_bf16():
                raise TrainingError("training.precision 'bf16': this CPU has no native bf16 (AVX512-BF16 or AMX), "
                                    "torch would emulate it far slower than fp32; use 'fp32' or 'auto'")
        return config.precision
    import torch

    return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def checkpointing_argument(enabled: bool) -> dict[str, bool]:
    """The training arguments' checkpointing switch under its name in the installed transformers: 5.25 renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on the old name; earlier 5.x know only the
    old one."""
    import dataclasses

    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _metrics_callback(sink: MetricSink):
    from transformers import TrainerCallback

    class StepMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
            if numeric:
                sink(numeric, state.global_step)

    return StepMetrics()


COMPLETE_MARKER = "flywheel-complete"


def _checkpoint_callback():
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        """The trainer writes a checkpoint file by file; mark it only once all of it is on disk."""

        def on_save(self, args, state, control, **kwargs):
            from flywheel.faults import fault_point

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and state.is_world_process_zero:  # one marker writer under `accelerate launch`
                for path in folder.rglob("*"):
                    if path.is_file():
                        with path.open("rb") as handle:
                            os.fsync(handle.fileno())
                atomic_write_text(folder / COMPLETE_MARKER, str(state.global_step))
            fault_point("during:train")

    return MarkComplete()


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was completely written; half-written ones (a kill mid-save) are removed."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    for partial in (p for p in found if p not in complete):
        shutil.rmtree(partial, ignore_errors=True)  # launched processes may race to remove the same one
    return complete[-1] if complete else None


def train(
    base_dir: Path,
    rows: list[dict],
    config: TrainingConfig,
    output_dir: Path,
    *,
    seed: int = 0,
    metrics: MetricSink | None = None,
    metadata: dict | None = None,
    checkpoint_dir: Path | None = None,
    method_options: dict | None = None,
) -> TrainedModel:
    """Fine-tune the model in ``base_dir`` on ``rows`` and save the full (merged) model to ``output_dir``.

    DPO rows have ``prompt``, ``chosen``, ``rejected``; SFT rows have ``prompt``, ``completion``; SAMI rows are SFT
    rows with ``constitution`` (see ``flywheel.sami``); GRPO rows are prompts with their ``constraints`` (see
    ``flywheel.reward``). ``method_options``: the method's own keyword arguments (GRPO's). With
    ``checkpoint_dir``, a checkpoint is saved every ``config.checkpoint_steps`` steps and a re-run resumes from the
    last complete one; the checkpoints are removed once the model is saved.
    """
    import torch

    from flywheel.models import load_model, load_tokenizer

    if not rows:
        raise TrainingError(f"no training rows for method {config.method!r}: nothing to learn from this round")
    device = resolve_device(config.device)
    precision = _precision(config, device)
    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, device="cpu", dtype="float32")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    common = dict(
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        logging_steps=1,
        save_strategy="steps" if checkpoint_dir and config.checkpoint_steps else "no",
        save_steps=config.checkpoint_steps or 500,
        save_total_limit=1,
        report_to="none",
        seed=seed,
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        disable_tqdm=False,
        dataloader_num_workers=0,
        **checkpointing_argument(config.gradient_checkpointing),
    )
    peft_config = None
    if config.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules="all-linear", task_type="CAUSAL_LM",
        )
    callbacks = [_metrics_callback(metrics)] if metrics else []
    resume_from = None
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        callbacks.append(_checkpoint_callback())
        resume_from = last_complete_checkpoint(checkpoint_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flywheel-train-") as tmp:
        scratch = str(checkpoint_dir) if checkpoint_dir is not None else tmp
        trainer = _make_trainer(config, model, tokenizer, rows, common, peft_config, callbacks, scratch,
                                method_options or {})
        usable = len(trainer.train_dataset)
        if usable == 0:
            raise TrainingError(
                f"all {len(rows)} training rows were longer than training.max_length={config.max_length} tokens "
                "and were dropped: raise max_length or shorten prompts"
            )
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    trained = trainer.model
    if config.lora.enabled:
        trained = trained.merge_and_unload()
    trained = trained.to("cpu").to(torch.float32)
    if config.extrapolation != 1.0:
        extrapolate(trained, before, config.extrapolation)
    after = dict(trained.named_parameters())
    moved = sum(1 for name, p in before.items() if name in after and not torch.equal(p, after[name].detach()))
    changed = moved / max(1, len(before))
    if moved == 0:
        raise TrainingError("training finished but no parameter changed: check learning_rate and the data")
    # Under `accelerate launch` every process gets here with the same weights; one writer, the others wait for it.
    main_process = trainer.accelerator.is_main_process
    if main_process:
        ref = save_model(trained, tokenizer, output_dir, source=f"trained:{config.method}", **(metadata or {}))
    trainer.accelerator.wait_for_everyone()
    if not main_process:
        ref = ModelRef(path=str(output_dir), sha256=read_metadata(output_dir)["sha256"], source=f"trained:{config.method}")
    if checkpoint_dir is not None and main_process:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the saved model supersedes them (GBs each)
    return TrainedModel(
        path=ref.path, sha256=ref.sha256, method=config.method, rows=len(rows), rows_used=usable, steps=result.global_step,
        train_loss=float(result.training_loss), seconds=seconds, device=device, precision=precision,
        changed_parameters=changed,
    )


def extrapolate(model, start: dict, factor: float) -> None:
    """Set each parameter of ``model`` to ``start + factor * (parameter - start)`` in place (``start``: the
    parameters by name before training). Tied weights are one parameter, so they move once."""
    import torch

    missing = [name for name, _ in model.named_parameters() if name not in start]
    if missing:
        raise TrainingError(f"cannot extrapolate: {len(missing)} trained parameters (first {missing[0]!r}) have no "
                            "starting value")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            origin = start[name].to(parameter.device, parameter.dtype)
            parameter.copy_(origin + factor * (parameter - origin))


def _make_trainer(config: TrainingConfig, model, tokenizer, rows: list[dict], common: dict, peft_config, callbacks,
                  output_dir: str, method_options: dict):
    """The TRL (or TRL-style) trainer of ``config.method``, ready to ``train()``; ``common``: the arguments every
    method shares (each trainer's config takes them)."""
    if config.method in ("dpo", "sft"):
        from datasets import Dataset

        dataset = Dataset.from_list([_conversational(row, config.method) for row in rows])
        if config.method == "dpo":
            from trl import DPOConfig, DPOTrainer

            losses = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, config.sft_weight]) \
                if config.sft_weight > 0 else {}
            return DPOTrainer(model=model, args=DPOConfig(output_dir=output_dir, beta=config.beta, **losses, **common),
                              train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                              callbacks=callbacks)
        from trl import SFTConfig, SFTTrainer

        trainer_class, anchor = SFTTrainer, {}
        if config.kl_weight > 0:
            import copy

            # The reference is the model before any update (and before peft wraps it): a frozen copy.
            trainer_class = _anchored_sft_trainer()
            anchor = dict(reference_model=copy.deepcopy(model), kl_weight=config.kl_weight,
                          kl_tokens=config.kl_tokens)
        trainer = trainer_class(model=model, args=SFTConfig(output_dir=output_dir, **common), train_dataset=dataset,
                                processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks, **anchor)
        if config.open_cut_off_targets:
            open_cut_off_endings(trainer, rows, tokenizer.eos_token_id)
        anchors = mask_anchor_answers(trainer, rows)
        if anchors and config.kl_weight <= 0:
            raise TrainingError(f"{anchors} KL anchor rows (strategy.repair.plain_anchors) but training.kl_weight is "
                                "0: an anchor has no loss without the KL term")
        return trainer
    if config.method == "sami":
        from flywheel.sami import make_sami_trainer

        return make_sami_trainer(model, tokenizer, rows, common, peft_config, callbacks, output_dir)
    if config.method == "grpo":
        from flywheel.reward import make_grpo_trainer

        return make_grpo_trainer(model, tokenizer, rows, common, peft_config, callbacks, output_dir, **method_options)
    raise TrainingError(f"unknown training method {config.method!r}")


def _relabel_rows(trainer, rows: list[dict], chosen: set[int], relabel, what: str) -> int:
    """``relabel(example)`` gives the new labels of each tokenized SFT row whose index is in ``chosen``; the
    tokenized rows must still match ``rows`` one to one. Returns ``len(chosen)``."""
    if not chosen:
        return 0
    dataset = trainer.train_dataset
    if len(dataset) != len(rows):
        raise TrainingError(f"the tokenized SFT dataset has {len(dataset)} rows for {len(rows)} training rows: "
                            f"cannot tell which of them {what}")

    def apply(example: dict, index: int) -> dict:
        return {"labels": relabel(example) if index in chosen else list(example["labels"])}

    trainer.train_dataset = dataset.map(apply, with_indices=True)
    return len(chosen)


def open_cut_off_endings(trainer, rows: list[dict], end_of_turn: int | None) -> int:
    """No loss on the end of turn (the end-of-turn token and what the chat template puts after it) of the SFT rows
    whose ``ended`` is false: the token limit cut their answers off, and training them to end there teaches the
    model to stop early (lists one item short, answers too brief). Returns how many rows were opened."""
    if end_of_turn is None:
        return 0

    def open_end(example: dict) -> list[int]:
        labels = list(example["labels"])
        ends = [at for at, (token, label) in enumerate(zip(example["input_ids"], labels))
                if token == end_of_turn and label != -100]
        if ends:
            labels[ends[-1]:] = [-100] * (len(labels) - ends[-1])
        return labels

    opened = {index for index, row in enumerate(rows) if not bool(row.get("ended", True))}
    return _relabel_rows(trainer, rows, opened, open_end, "were cut off")


def mask_anchor_answers(trainer, rows: list[dict]) -> int:
    """No loss on the answers of KL anchor rows (``flywheel.repair.ANCHOR_ORIGIN``): their tokens then count as
    untrained tokens, which the KL term of :func:`_anchored_sft_trainer` holds to the starting model. Returns how
    many rows are anchors."""
    from flywheel.repair import ANCHOR_ORIGIN

    anchors = {index for index, row in enumerate(rows) if row.get("origin") == ANCHOR_ORIGIN}
    return _relabel_rows(trainer, rows, anchors, lambda example: [-100] * len(example["labels"]), "are KL anchors")


def _anchored_sft_trainer():
    """TRL's SFTTrainer with a KL(reference || policy) term added to the answer tokens' negative log-likelihood.

    Fine-tuning on a model's own (edited) samples pulls every next-token distribution towards the sampled token, so
    the model grows more certain of its habits round after round. The forward KL to the frozen starting model
    charges for probability moved off what the reference says: on the request tokens (``kl_tokens="prompt"``, text
    the SFT loss ignores) it anchors ordinary language modelling while the answers move freely; on the answer tokens
    it resists the targets themselves. The NLL is normalized as TRL's SFT loss; the KL is a mean over its tokens,
    spread over gradient accumulation like TRL's auxiliary losses, so ``kl_weight=0`` reduces to TRL's loss."""
    import torch
    from trl import SFTTrainer

    class AnchoredSFTTrainer(SFTTrainer):
        def __init__(self, *args, reference_model, kl_weight: float, kl_tokens: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.reference_model = reference_model.to(self.args.device).eval().requires_grad_(False)
            self.kl_weight = kl_weight
            self.kl_tokens = kl_tokens

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            forward = {key: value for key, value in inputs.items() if key != "labels"}
            forward["use_cache"] = False
            outputs = model(**forward)
            with torch.no_grad():
                reference = self.reference_model(**forward).logits[:, :-1].float().log_softmax(-1)
            log_probs = outputs.logits[:, :-1].float().log_softmax(-1)
            targets = inputs["labels"][:, 1:]
            answer = targets != -100
            if self.kl_tokens == "answer":
                anchored = answer
            else:  # every real token not trained on, not padding (no mask: padding-free rows): the requests, and
                # the whole of a KL anchor row (mask_anchor_answers)
                real = inputs["attention_mask"][:, 1:].bool() if "attention_mask" in inputs else torch.ones_like(answer)
                anchored = real & ~answer
            nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            kl = torch.nn.functional.kl_div(log_probs, reference, reduction="none", log_target=True).sum(-1)
            count = answer.sum() if num_items_in_batch is None else num_items_in_batch
            loss = (nll * answer).sum() / torch.as_tensor(count, device=answer.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL's SFT loss: DDP averages the gradients
            kl_mean = (kl * anchored).sum() / anchored.sum().clamp(min=1)
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.kl_weight * kl_mean / steps
            mode = "train" if model.training else "eval"
            self._metrics[mode]["nll"].append(((nll * answer).sum() / answer.sum().clamp(min=1)).item())
            self._metrics[mode]["kl"].append(kl_mean.item())
            return (loss, outputs) if return_outputs else loss

    return AnchoredSFTTrainer


def _conversational(row: dict, method: str) -> dict:
    prompt = [{"role": "user", "content": row["prompt"]}]
    if method == "dpo":
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": row["completion"]}]}
