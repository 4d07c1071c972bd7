"""SAMI (Fränken et al. 2024, "Self-Supervised Alignment with Mutual Information"): a model learns to follow
principles without preference labels.

1. A writer model adds principles to the seed ones and writes each one's antithesis (its opposite).
2. Per prompt, a few constitutions are sampled: some principles, each as itself or as its antithesis.
3. The policy answers the prompt once under each constitution (the constitution is the system message).
4. The trainer maximizes the conditional mutual information between constitution and response: over the C x C
   matrix of length-normalized log p(response_j | prompt, constitution_i), where response_j was written under
   constitution_j, a symmetric InfoNCE loss makes the diagonal win its row and its column.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel.generation import Completion, Engine, EngineError, Progress, Request, SamplingParams, user_request
from flywheel.prompts import Prompt

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from flywheel.config import SamiConfig
    from flywheel.judges import Judge

ORIGIN = "sami:response"
EXTRA_COLUMNS = ["constitution_id", "constitution", "origin", "judge", "n_tokens", "finished"]

PRINCIPLES_PROMPT = """Here are principles for a helpful assistant that follows instructions:
{numbered}

Write {n} more principles like these: each short, one per line, different from the ones above. Write only the \
principles."""

ANTITHESIS_PROMPT = """Here is a principle for an assistant:
{principle}

Write its opposite: one short sentence telling the assistant to do the reverse. Write only that sentence."""

# Used where no writer is available or its antithesis is unusable: still a principle the policy can contrast with.
ANTITHESIS_FALLBACK = "Ignore this principle: {principle}"

MAX_PRINCIPLE_CHARS = 200  # longer lines are rambling, not principles
MIN_PRINCIPLE_WORDS = 3  # shorter lines are headers ("Principles:") or fragments
WRITER_TEMPERATURE = 0.8  # new principles should differ from each other; antitheses are written greedily
WRITER_TOP_P = 0.95

_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.):]|principle\s*\d*\s*:|opposite\s*:|antithesis\s*:)\s*", re.I)


# --- principles and antitheses -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Principles:
    principles: list[str]
    antitheses: list[str]  # antitheses[k] is the opposite of principles[k]
    written: int  # principles the writer added to the seeds
    fallbacks: int  # antitheses that are the template, not the writer's

    def __post_init__(self) -> None:
        if not self.principles:
            raise ValueError("Principles needs at least one principle")
        if len(self.principles) != len(self.antitheses):
            raise ValueError(f"{len(self.principles)} principles but {len(self.antitheses)} antitheses")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clean_line(line: str) -> str:
    text = _BULLET.sub("", line.strip()).strip()
    return text.strip("\"'`").strip()


def _key(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".!;")


def _acceptable(text: str) -> bool:
    return bool(text) and len(text) <= MAX_PRINCIPLE_CHARS and len(text.split()) >= MIN_PRINCIPLE_WORDS


def _check_seeds(seeds: Sequence[str]) -> list[str]:
    seeds = [s.strip() for s in seeds]
    if not seeds or any(not s for s in seeds):
        raise ValueError("SAMI needs at least one non-empty seed principle")
    if len({_key(s) for s in seeds}) != len(seeds):
        raise ValueError(f"seed principles repeat one another: {seeds}")
    return seeds


def _one_per_request(completions: list[Completion], requests: int, what: str) -> list[Completion]:
    if len(completions) != requests:
        raise EngineError(f"SAMI writer: asked for {requests} {what}, the engine returned {len(completions)}")
    return sorted(completions, key=lambda c: (c.request_index, c.sample_index))


def write_principles(engine: Engine | None, seeds: Sequence[str], n: int, *, max_new_tokens: int,
                     seed: int) -> list[str]:
    """The seeds plus up to ``n`` new principles the writer wrote (none without a writer).

    One request, ``n`` samples: every line of every sample is a candidate, so a writer that lists several per
    sample and one that writes one per sample both work within a short ``max_new_tokens``.
    """
    seeds = _check_seeds(seeds)
    if engine is None or n <= 0:
        return seeds
    numbered = "\n".join(f"{k}. {s}" for k, s in enumerate(seeds, 1))
    request = user_request(PRINCIPLES_PROMPT.format(numbered=numbered, n=n))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=WRITER_TEMPERATURE, top_p=WRITER_TOP_P,
                            seed=seed)
    completions = _one_per_request(engine.generate([request], n, params), n, "principle samples")
    seen = {_key(s) for s in seeds}
    added: list[str] = []
    for completion in completions:
        for line in completion.text.splitlines():
            text = _clean_line(line)
            if len(added) < n and _acceptable(text) and _key(text) not in seen:
                seen.add(_key(text))
                added.append(text)
    return seeds + added


def _antitheses(engine: Engine | None, principles: Sequence[str], *, max_new_tokens: int,
                seed: int) -> tuple[list[str], int]:
    fallback = [ANTITHESIS_FALLBACK.format(principle=p) for p in principles]
    if engine is None or not principles:
        return fallback, len(principles)
    requests = [user_request(ANTITHESIS_PROMPT.format(principle=p)) for p in principles]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    completions = _one_per_request(engine.generate(requests, 1, params), len(requests), "antitheses")
    result, fallbacks = [], 0
    for principle, completion, default in zip(principles, completions, fallback):
        lines = [_clean_line(line) for line in completion.text.splitlines()]
        text = next((line for line in lines if line), "")
        if _acceptable(text) and _key(text) != _key(principle):
            result.append(text)
        else:
            result.append(default)
            fallbacks += 1
    return result, fallbacks


def write_antitheses(engine: Engine | None, principles: Sequence[str], *, max_new_tokens: int,
                     seed: int) -> list[str]:
    """Each principle's opposite, by the writer (greedy), or ``ANTITHESIS_FALLBACK`` where it gives none usable."""
    return _antitheses(engine, principles, max_new_tokens=max_new_tokens, seed=seed)[0]


def write_constitution_parts(engine: Engine | None, seeds: Sequence[str], n: int, *, max_new_tokens: int,
                             seed: int) -> Principles:
    """Principles (seeds + written) and their antitheses, with how many were written and how many fell back."""
    principles = write_principles(engine, seeds, n, max_new_tokens=max_new_tokens, seed=seed)
    antitheses, fallbacks = _antitheses(engine, principles, max_new_tokens=max_new_tokens, seed=seed + 1)
    return Principles(principles=principles, antitheses=antitheses, written=len(principles) - len(seeds),
                      fallbacks=fallbacks)


# --- constitutions -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Constitution:
    id: str  # e.g. "0+.3-": principle 0 as itself, principle 3 as its antithesis
    text: str  # a numbered list, the system message
    signs: tuple[bool, ...]  # True: the principle itself; False: its antithesis
    indices: tuple[int, ...] = field(default=())  # which principles, in the order of the list


_ENUMERATE_LIMIT = 20_000  # below this many possible constitutions, draw without replacement from all of them


def _constitution(principles: Sequence[str], antitheses: Sequence[str], indices: tuple[int, ...],
                  signs: tuple[bool, ...]) -> Constitution:
    lines = [principles[i] if keep else antitheses[i] for i, keep in zip(indices, signs)]
    return Constitution(
        id=".".join(f"{i}{'+' if keep else '-'}" for i, keep in zip(indices, signs)),
        text="\n".join(f"{k}. {line}" for k, line in enumerate(lines, 1)),
        signs=signs,
        indices=indices,
    )


def sample_constitutions(principles: Sequence[str], antitheses: Sequence[str], *, per_prompt: int,
                         principles_per_constitution: int, rng: random.Random) -> list[Constitution]:
    """``per_prompt`` pairwise different constitutions of ``principles_per_constitution`` principles each, every
    principle kept or replaced by its antithesis at random (a fair coin)."""
    import math

    if len(principles) != len(antitheses):
        raise ValueError(f"{len(principles)} principles but {len(antitheses)} antitheses")
    k = principles_per_constitution
    if k < 1 or k > len(principles):
        raise ValueError(f"principles_per_constitution={k} needs between 1 and {len(principles)} (the principles)")
    possible = math.comb(len(principles), k) * 2 ** k
    if per_prompt > possible:
        raise ValueError(f"{per_prompt} different constitutions per prompt are impossible: {len(principles)} "
                         f"principles, {k} per constitution give only {possible}")
    if possible <= _ENUMERATE_LIMIT:
        every = [(idx, signs) for idx in itertools.combinations(range(len(principles)), k)
                 for signs in itertools.product((True, False), repeat=k)]
        chosen = rng.sample(every, per_prompt)
    else:
        # Large space: collisions are rare, so redraw until the constitutions differ.
        chosen, seen = [], set()
        while len(chosen) < per_prompt:
            idx = tuple(sorted(rng.sample(range(len(principles)), k)))
            signs = tuple(rng.random() < 0.5 for _ in idx)
            if (idx, signs) not in seen:
                seen.add((idx, signs))
                chosen.append((idx, signs))
    return [_constitution(principles, antitheses, idx, signs) for idx, signs in chosen]


# --- the policy's responses ---------------------------------------------------------------------------------------

def constitution_request(constitution: str, prompt: str) -> Request:
    return Request(messages=({"role": "system", "content": constitution}, {"role": "user", "content": prompt}))


def sami_rows(prompts: Sequence[Prompt], engine: Engine, principles_data: Principles, options: SamiConfig, *,
              max_new_tokens: int, temperature: float, top_p: float, seed: int, judge: Judge | None = None,
              progress: Progress | None = None) -> pd.DataFrame:
    """One row per (prompt, constitution): the policy's answer under that constitution (one generate call).

    Columns: SFT_COLUMNS (``completion`` the answer; ``score`` the judge's, 0.0 without a judge) + EXTRA_COLUMNS.
    Each prompt's constitutions are drawn from a generator seeded by (seed, prompt id), so they do not depend on
    which other prompts share the round.
    """
    import pandas as pd

    from flywheel.dataset import SFT_COLUMNS

    columns = SFT_COLUMNS + EXTRA_COLUMNS
    if not prompts:
        return pd.DataFrame([], columns=columns)
    plan: list[tuple[Prompt, int, Constitution]] = []
    for prompt in prompts:
        rng = random.Random(f"sami:{seed}:{prompt.id}")
        drawn = sample_constitutions(
            principles_data.principles, principles_data.antitheses, per_prompt=options.constitutions_per_prompt,
            principles_per_constitution=options.principles_per_constitution, rng=rng,
        )
        plan.extend((prompt, i, c) for i, c in enumerate(drawn))
    requests = [constitution_request(c.text, p.prompt) for p, _, c in plan]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    completions = engine.generate(requests, 1, params, progress=progress)
    if len(completions) != len(requests):
        raise EngineError(f"SAMI: asked for {len(requests)} responses, the engine returned {len(completions)}")
    completions = sorted(completions, key=lambda c: (c.request_index, c.sample_index))
    scores = [0.0] * len(plan)
    if judge is not None:
        from flywheel.judges import JudgeError

        verdicts = judge.judge([(p, c.text) for (p, _, _), c in zip(plan, completions)])
        if len(verdicts) != len(plan):
            raise JudgeError(f"judge {judge.name} ({judge.source}) gave {len(verdicts)} verdicts for {len(plan)} rows")
        scores = [float(v.score) for v in verdicts]
    rows = [
        {
            "row_id": f"{p.id}-c{i}", "prompt_id": p.id, "prompt": p.prompt, "completion": done.text,
            "score": score, "constitution_id": c.id, "constitution": c.text, "origin": ORIGIN,
            "judge": judge.name if judge is not None else "none", "n_tokens": done.n_tokens,
            "finished": done.finished,
        }
        for (p, i, c), done, score in zip(plan, completions, scores)
    ]
    return pd.DataFrame(rows, columns=columns)


# --- the loss -----------------------------------------------------------------------------------------------------

def sami_loss(logprob_matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a C x C matrix, entry [i, j] = log p(response_j | constitution_i): the mean of the
    cross-entropy of each row (which response belongs to constitution i) and of each column (which constitution
    wrote response j), the diagonal being the target."""
    import torch
    import torch.nn.functional as F

    if logprob_matrix.dim() != 2 or logprob_matrix.shape[0] != logprob_matrix.shape[1] or logprob_matrix.shape[0] < 2:
        raise ValueError(f"sami_loss needs a square C x C matrix with C >= 2, got shape {tuple(logprob_matrix.shape)}")
    matrix = logprob_matrix.float()
    target = torch.arange(matrix.shape[0], device=matrix.device)
    return (F.cross_entropy(matrix, target) + F.cross_entropy(matrix.T, target)) / 2


def diagonal_accuracy(logprob_matrix: torch.Tensor) -> float:
    """Share of rows and columns whose largest entry is on the diagonal."""
    import torch

    target = torch.arange(logprob_matrix.shape[0], device=logprob_matrix.device)
    rows = (logprob_matrix.argmax(dim=1) == target).float().mean()
    cols = (logprob_matrix.argmax(dim=0) == target).float().mean()
    return float((rows + cols) / 2)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each sequence's labelled tokens (labels -100 elsewhere): shape [N]."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    # Only the scored positions go through log_softmax: the full [N, T, V] float32 copy would dominate memory.
    picked = logits[mask].float().log_softmax(dim=-1)
    token_logps = picked.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(targets.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, mask.nonzero()[:, 0], token_logps)
    return sums / mask.sum(dim=1).clamp(min=1)


# --- the trainer --------------------------------------------------------------------------------------------------

def _chat_ids(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _prompt_messages(constitution: str, prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": constitution}, {"role": "user", "content": prompt}]


class SAMICollator:
    """A batch of groups -> every group's C x C sequences (constitution i's prompt, response j), right-padded.

    Labels are -100 except on the response (and the template's end-of-turn tokens after it); sequences are cut at
    ``max_length`` from the right, so the constitution and prompt are always whole.
    """

    def __init__(self, tokenizer, max_length: int | None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad SAMI batches with")
        self.pad_id = pad

    def encode(self, constitution: str, prompt: str, response: str) -> tuple[list[int], list[int]]:
        messages = _prompt_messages(constitution, prompt)
        head = _chat_ids(self.tokenizer, messages, generation_prompt=True)
        full = _chat_ids(self.tokenizer, messages + [{"role": "assistant", "content": response}], False)
        # Where the rendered conversation leaves the prompt: templates that render the generation prompt exactly
        # as the assistant turn's opening (ChatML and most others) split at len(head).
        split = next((k for k, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        if self.max_length is not None:
            full = full[:self.max_length]
        labels = [-100] * min(split, len(full)) + full[split:]
        return full, labels

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        sequences, sizes = [], []
        for group in features:
            constitutions, responses = group["constitutions"], group["responses"]
            sizes.append(len(constitutions))
            sequences.extend(self.encode(c, group["prompt"], r) for c in constitutions for r in responses)
        width = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(sequences), width), -100, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(labs)] = torch.tensor(labs)
            attention[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "group_sizes": torch.tensor(sizes, dtype=torch.long)}


def sami_groups(rows: Sequence[dict[str, Any]], tokenizer=None, max_length: int | None = None) -> list[dict]:
    """Rows (after the quality gate) -> one training item per prompt with at least two usable rows.

    Usable: a constitution and a response not already in the group (a repeated one makes two rows or columns of
    the matrix identical, which no model can tell apart), and, with a tokenizer and ``max_length``, a prompt
    (constitution + request) shorter than ``max_length`` tokens, so some of the response is left to score.
    """
    missing = {"prompt_id", "prompt", "completion", "constitution"} - set(rows[0]) if rows else set()
    if missing:
        raise ValueError(f"SAMI rows lack columns {sorted(missing)}")
    groups: dict[Any, dict] = {}
    for row in rows:
        group = groups.setdefault(row["prompt_id"], {"prompt_id": str(row["prompt_id"]), "prompt": row["prompt"],
                                                     "constitutions": [], "responses": []})
        constitution, response = str(row["constitution"]), str(row["completion"])
        if constitution in group["constitutions"] or response.strip() in {r.strip() for r in group["responses"]}:
            continue
        if tokenizer is not None and max_length is not None:
            head = _chat_ids(tokenizer, _prompt_messages(constitution, group["prompt"]), generation_prompt=True)
            if len(head) >= max_length:
                continue
        group["constitutions"].append(constitution)
        group["responses"].append(response)
    return [g for g in groups.values() if len(g["constitutions"]) >= 2]


def sami_config_class():
    """``SAMIConfig``: TrainingArguments plus ``max_length``; built lazily to keep transformers out of imports."""
    global _SAMI_CONFIG
    if _SAMI_CONFIG is None:
        from dataclasses import dataclass as _dataclass
        from dataclasses import field as _field

        from transformers import TrainingArguments

        @_dataclass
        class SAMIConfig(TrainingArguments):
            max_length: int | None = _field(default=384, metadata={"help": "Tokens per sequence (prompt + response)."})
            # The dataset's columns (constitutions, responses) are not model inputs; the collator needs them.
            remove_unused_columns: bool = _field(default=False)

        # Trainer pickles its arguments into every checkpoint: make the class findable as flywheel.sami.SAMIConfig
        # (the module's __getattr__ returns this same class).
        SAMIConfig.__qualname__ = "SAMIConfig"
        _SAMI_CONFIG = SAMIConfig
    return _SAMI_CONFIG


def sami_trainer_class():
    """``SAMITrainer``: a ``transformers.Trainer`` whose loss is ``sami_loss`` over each group's matrix."""
    global _SAMI_TRAINER
    if _SAMI_TRAINER is None:
        from transformers import Trainer

        class SAMITrainer(Trainer):
            # compute_loss returns a per-batch mean, not a token-normalized sum: let Trainer divide by the
            # accumulation steps (it skips that for models whose forward takes **kwargs, as most causal LMs do).
            loss_is_scaled_for_ga = False

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._sami_logs: dict[str, list[float]] = {"sami_accuracy": [], "sami_margin": []}

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                import torch

                logps = sequence_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
                losses, start = [], 0
                for size in inputs["group_sizes"].tolist():
                    matrix = logps[start:start + size * size].view(size, size)
                    start += size * size
                    losses.append(sami_loss(matrix))
                    with torch.no_grad():
                        diag = matrix.diagonal()
                        off = (matrix.sum() - diag.sum()) / (size * size - size)
                        self._sami_logs["sami_accuracy"].append(diagonal_accuracy(matrix))
                        self._sami_logs["sami_margin"].append(float(diag.mean() - off))
                loss = torch.stack(losses).mean()
                return (loss, {"logprobs": logps}) if return_outputs else loss

            def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
                # Averages since the last log, beside the loss Trainer logs (not on the end-of-training summary).
                if "loss" in logs:
                    for key, values in self._sami_logs.items():
                        if values:
                            logs[key] = sum(values) / len(values)
                            values.clear()
                super().log(logs, start_time)

        SAMITrainer.__qualname__ = "SAMITrainer"
        _SAMI_TRAINER = SAMITrainer
    return _SAMI_TRAINER


_SAMI_CONFIG = None
_SAMI_TRAINER = None


def make_sami_trainer(model, tokenizer, rows: list[dict], common: dict, peft_config, callbacks,
                      output_dir: str):
    """A ``SAMITrainer`` over ``rows`` (``sami_rows`` after the quality gate), ready for ``train()``.

    ``common`` is the TrainingArguments dict ``flywheel.training.train`` builds for every method
    (``per_device_train_batch_size`` counts prompt groups); ``len(trainer.train_dataset)`` is the usable groups.
    """
    from datasets import Dataset

    config_class = sami_config_class()
    args = config_class(output_dir=output_dir, **common)
    groups = sami_groups(rows, tokenizer, args.max_length)
    dataset = Dataset.from_list(groups) if groups else Dataset.from_dict(
        {"prompt_id": [], "prompt": [], "constitutions": [], "responses": []})
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
        if args.gradient_checkpointing:
            # Frozen embeddings give checkpointed blocks inputs without grad; LoRA then gets none (as TRL does).
            model.enable_input_require_grads()
    return sami_trainer_class()(
        model=model, args=args, train_dataset=dataset, data_collator=SAMICollator(tokenizer, args.max_length),
        processing_class=tokenizer, callbacks=list(callbacks or []),
    )


def __getattr__(name: str):
    # `from flywheel.sami import SAMIConfig, SAMITrainer` works without importing transformers at module import.
    if name == "SAMIConfig":
        return sami_config_class()
    if name == "SAMITrainer":
        return sami_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
