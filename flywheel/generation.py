"""Generation: a model answers prompts, several samples each, in length-sorted batches.

Engines sit behind one small interface so faster backends can replace the default without touching the stages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_new_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    request_index: int
    sample_index: int
    text: str
    n_tokens: int
    finished: bool  # ended with EOS rather than at the token limit


@dataclass(frozen=True)
class Request:
    messages: tuple[dict[str, str], ...]


Progress = Callable[[int], None]


class EngineError(RuntimeError):
    """A generation backend failed; the single-line message names the backend (URL, model folder) and the problem."""


class Engine(Protocol):
    def generate(
        self, requests: Sequence[Request], samples: int, params: SamplingParams, progress: Progress | None = None
    ) -> list[Completion]: ...


def user_request(prompt: str) -> Request:
    return Request(messages=({"role": "user", "content": prompt},))


class TransformersEngine:
    """Batched generation with a transformers model on CPU or GPU, sorted by prompt length so padding stays small.

    The engine runs its own decode loop over the model's forward pass (``_decode``) rather than ``model.generate``:
    each distinct prompt is pre-filled once however many samples it has and its keys and values are read once a
    step for all of them (``flywheel.shared_prompt``), the KV cache is written in place (``reserved_cache``),
    sampling never sorts the vocabulary (``nucleus``), and rows that have produced EOS leave the batch instead of
    being computed until the batch's longest answer ends. ``decoder = "generate"`` runs plain
    ``model.generate`` instead, every row pre-filling its own prompt: the reference the loop's answers are checked
    against (tests, ``bench/generation.py``), identical for a given seed.
    """

    def __init__(self, model_dir: Path, device: str = "cpu", batch_size: int = 32, precision: str = "auto"):
        from flywheel.models import load_model, load_tokenizer

        self.device = device
        self.batch_size = batch_size
        self.decoder = "flywheel"
        # Reference path only: transformers' own temperature/top-p warpers and multinomial (other draws, same
        # distribution) instead of NucleusSampler, to measure what the sampler saves.
        self.fast_sampling = True
        self.precision = resolve_precision(precision, device)
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        dtype = "bfloat16" if self.precision == "bf16" else "float32"
        self.model = load_model(model_dir, device=device, dtype=dtype).eval()
        from flywheel import shared_prompt

        # Samples of one prompt read its keys and values once per decode step (flywheel.shared_prompt); False: each
        # row its own copy, as before (bench/generation.py measures both). fp32 only: its scores and softmax run in
        # the model's dtype, where sdpa accumulates bf16 in fp32.
        self.shared_prompts = self.precision == "fp32" and shared_prompt.enable(self.model)
        # transformers 5.25 renamed forward's ``past_key_values`` to ``cache`` (the old name warns until 5.40).
        import inspect

        self._cache_argument = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"

    def encode(self, request: Request) -> list[int]:
        return encode_request(self.tokenizer, request)

    def generate(
        self, requests: Sequence[Request], samples: int, params: SamplingParams, progress: Progress | None = None
    ) -> list[Completion]:
        import torch

        if self.decoder not in ("flywheel", "generate"):
            raise EngineError(f"unknown decoder {self.decoder!r} (flywheel or generate)")
        encoded = [self.encode(r) for r in requests]
        jobs = length_sorted_jobs(encoded, samples)
        eos_ids = self._eos_ids()
        pad_id = self.tokenizer.pad_token_id
        results: list[Completion] = []
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            width = max(len(encoded[i]) for i, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (i, _) in enumerate(batch):
                tokens = encoded[i]
                ids[row, width - len(tokens):] = torch.tensor(tokens)
                mask[row, width - len(tokens):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            # Seeded per batch position so a resumed or re-ordered run draws the same samples.
            torch.manual_seed(params.seed * 1_000_003 + start)
            with torch.inference_mode():
                if self.decoder == "generate":
                    answers = self._reference_generate(ids, mask, params, eos_ids, pad_id)
                else:
                    answers = self._decode(ids, mask, [i for i, _ in batch], params, set(eos_ids))
            for (i, s), (tokens, finished) in zip(batch, answers):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                results.append(
                    Completion(request_index=i, sample_index=s, text=text, n_tokens=len(tokens), finished=finished)
                )
            if progress:
                progress(len(batch))
        results.sort(key=lambda c: (c.request_index, c.sample_index))
        return results

    def _decode(self, ids, mask, request_of_row: list[int], params: SamplingParams,
                eos: set[int]) -> list[tuple[list[int], bool]]:
        """Each row's new tokens (EOS excluded) and whether it ended with EOS, for one left-padded batch.

        Samples of one request sit next to each other (``length_sorted_jobs``) and share their prompt, so the
        pre-fill runs once per distinct request (with 4 samples of ~70-token prompts and ~96 new tokens, pre-filling
        every row would repeat about a fifth of the batch's compute), and its cache stays one copy that the samples'
        attention reads together (``shared_prompts``; otherwise it is copied to each sample's row). Rows that produce
        EOS stop there; they leave the cache once they are an eighth of the rows still in it (dropping them copies
        the cache, so one at a time would cost more than it saves).

        Draws: one uniform number per batch row every step while any row runs, in batch order, whether or not the
        row still runs — the numbers ``model.generate`` with ``NucleusSampler`` draws — so a row's answer does not
        depend on when other rows finish, and equals the reference path's (with shared prompts, up to the rare draw
        that lands within float rounding of a boundary between two tokens: 255 of 256 answers in bench/README.md).
        """
        import torch

        from flywheel.shared_prompt import shared_prompt_cache

        rows, width = ids.shape
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        first_row: dict[int, int] = {}
        for row, request in enumerate(request_of_row):
            first_row.setdefault(request, row)
        shared = self.shared_prompts and len(first_row) < rows
        reserve = min(params.max_new_tokens, RESERVE_STEP)  # new tokens' room before the cache grows
        cache = shared_prompt_cache(width) if shared else reserved_cache(width + reserve)
        unique = torch.tensor(list(first_row.values()), device=ids.device)
        logits = self.model(input_ids=ids[unique], attention_mask=mask[unique], position_ids=positions[unique],
                            use_cache=True, logits_to_keep=1, **{self._cache_argument: cache}).logits[:, -1, :]
        if len(first_row) < rows:
            slot = {request: n for n, request in enumerate(first_row)}
            expand = torch.tensor([slot[r] for r in request_of_row], device=ids.device)
            if shared:
                cache.share(request_of_row, mask[unique], reserve)
            else:
                cache.batch_select_indices(expand)
            logits = logits[expand]
        next_position = mask.sum(-1, keepdim=True)
        in_cache = list(range(rows))  # batch row of each cache row
        running = [True] * rows
        answers: list[list[int]] = [[] for _ in range(rows)]
        sampling = params.temperature > 0
        for step in range(params.max_new_tokens):
            if sampling:
                draws = torch.rand((rows, 1), device=ids.device)[torch.tensor(in_cache, device=ids.device)]
                chosen = draw_tokens(logits.float(), params.temperature, params.top_p, draws)
            else:
                chosen = logits.argmax(dim=-1, keepdim=True)
            for row, token in zip(in_cache, chosen[:, 0].tolist()):
                if not running[row]:
                    continue
                if token in eos:
                    running[row] = False
                else:
                    answers[row].append(token)
            if step == params.max_new_tokens - 1 or not any(running):
                break
            stopped = sum(not running[row] for row in in_cache)
            if stopped and stopped * 8 >= len(in_cache):
                keep = [k for k, row in enumerate(in_cache) if running[row]]
                selected = torch.tensor(keep, device=ids.device)
                if shared:
                    cache.keep_rows(selected)
                else:
                    cache.batch_select_indices(selected)
                    mask = mask[selected]
                next_position, chosen = next_position[selected], chosen[selected]
                in_cache = [in_cache[k] for k in keep]
            if shared:  # the cache holds the prompts' padding; a row's own tokens are never padded
                logits = self.model(input_ids=chosen, position_ids=next_position, use_cache=True, shared_prompt=cache,
                                    **{self._cache_argument: cache}).logits[:, -1, :]
                if cache.unattended():
                    raise EngineError(f"{type(self.model).__name__}'s attention does not go through transformers' "
                                      "attention interface: set engine.shared_prompts = False")
            else:
                mask = torch.cat([mask, mask.new_ones((len(in_cache), 1))], dim=-1)
                logits = self.model(input_ids=chosen, attention_mask=mask, position_ids=next_position,
                                    use_cache=True, **{self._cache_argument: cache}).logits[:, -1, :]
            next_position = next_position + 1
        return [(answer, not still) for answer, still in zip(answers, running)]

    def _reference_generate(self, ids, mask, params: SamplingParams, eos_ids: list[int],
                            pad_id: int) -> list[tuple[list[int], bool]]:
        """Plain ``model.generate``: every row pre-fills its prompt, transformers' DynamicCache, rows run until the
        batch's longest answer ends. With NucleusSampler as a logits processor generate decodes greedily: the
        processor leaves only the token it drew, so argmax takes it."""
        from transformers import LogitsProcessorList

        sampling = params.temperature > 0
        sampler = sampling and self.fast_sampling
        warpers = sampling and not sampler
        extra = {"logits_processor": LogitsProcessorList([NucleusSampler(params.temperature, params.top_p)])} \
            if sampler else {}
        output = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=params.max_new_tokens,
            do_sample=warpers,
            temperature=params.temperature if warpers else None,
            top_p=params.top_p if warpers else None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            **extra,
        )
        return [_cut_at_eos(tokens, set(eos_ids)) for tokens in output[:, ids.shape[1]:].tolist()]

    def _eos_ids(self) -> list[int]:
        return eos_token_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))


RESERVE_STEP = 128  # positions a reserved cache grows by: a copy every 128 tokens, at most 127 unused per row


def reserved_cache(capacity: int):
    """An empty ``DynamicCache`` whose layers write new keys and values in place into tensors with room for
    ``capacity`` positions, and hand attention a view of the filled part; past that it grows by ``RESERVE_STEP``
    positions at a time (one copy per step of 128, not one per token, and memory stays near what is used).

    transformers' ``DynamicLayer`` concatenates each layer's whole cache with the new token every step, so a decode
    step copies the entire cache (30 layers x keys and values): at 128 rows and ~170 positions about 0.9 GB a step.
    On 2 CPU cores that was the profile's second largest item after the linear layers, and writing in place made a
    128-row batch 13% faster. Attention reads the same values in the same order either way, so the answers are
    identical.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    layer_class = _reserved_layer_class()
    cache.layer_class_to_replicate = lambda: layer_class(capacity)
    return cache


@functools.cache
def _reserved_layer_class():
    import torch
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self.key_buffer = self.value_buffer = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if self.key_buffer is None or end > self.key_buffer.shape[-2]:
                self.key_buffer = self._grown(self.key_buffer, key_states, end)
                self.value_buffer = self._grown(self.value_buffer, value_states, end)
            self.key_buffer[:, :, self.length:end].copy_(key_states)
            self.value_buffer[:, :, self.length:end].copy_(value_states)
            self.length = end
            self._refresh()
            return self.keys, self.values

        def _grown(self, buffer, states, end: int):
            batch, heads, _, dim = states.shape
            size = self.capacity if buffer is None else end + RESERVE_STEP
            grown = states.new_empty((batch, heads, max(end, size), dim))
            if buffer is not None:
                grown[:, :, :self.length].copy_(buffer[:, :, :self.length])
            return grown

        def _refresh(self) -> None:
            self.keys = self.key_buffer[:, :, :self.length]
            self.values = self.value_buffer[:, :, :self.length]

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0
            self.key_buffer = self.value_buffer = None
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError(f"crop takes a negative count of positions to remove (got {tokens_to_remove})")
            if tokens_to_remove and self.key_buffer is not None:
                self.length = max(0, self.length + tokens_to_remove)
                self._refresh()

        def _select(self, rows) -> None:
            """Keep the given batch rows (repeats allowed), copying only the filled positions."""
            if self.key_buffer is not None:
                rows = rows.to(self.key_buffer.device)
                self.key_buffer = self._rows(self.key_buffer, rows)
                self.value_buffer = self._rows(self.value_buffer, rows)
                self._refresh()

        def _rows(self, buffer, rows):
            _, heads, capacity, dim = buffer.shape
            selected = buffer.new_empty((len(rows), heads, capacity, dim))
            torch.index_select(buffer[:, :, :self.length], 0, rows, out=selected[:, :, :self.length])
            return selected

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.key_buffer is not None:
                self._select(torch.arange(self.key_buffer.shape[0]).repeat_interleave(repeats))

        def batch_select_indices(self, indices) -> None:
            self._select(indices)

        def reorder_cache(self, beam_idx) -> None:
            self._select(beam_idx)

    return ReservedLayer


def nucleus(scores, temperature: float, top_p: float, candidates: int = 256) -> list[tuple]:
    """The tokens temperature + top-p sampling may draw from each row of ``scores`` (batch x vocabulary logits):
    a list of ``(rows, token_ids, weights)`` groups that together cover every row once; ``weights`` are the tokens'
    probabilities (0 outside the nucleus) and need not sum to 1.

    The distribution of transformers' ``TemperatureLogitsWarper`` then ``TopPLogitsWarper`` (a token is kept when
    the tokens ranked above it hold less than ``top_p`` of the mass; the most likely is always kept), without
    sorting the whole vocabulary: the nucleus lies within a row's ``candidates`` most likely tokens whenever they
    hold at least ``top_p`` of its mass; only the rows where they do not (near-flat distributions) are sorted in
    full. Ties at the nucleus boundary and float rounding of the cumulative sums may keep or drop a boundary token
    differently from transformers' ascending sort.
    """
    import torch

    probs = torch.softmax(scores.float() / temperature, dim=-1)
    rows = torch.arange(probs.shape[0], device=probs.device)
    vocabulary = probs.shape[-1]
    if top_p >= 1.0:
        return [(rows, torch.arange(vocabulary, device=probs.device).expand_as(probs), probs)]
    top, ids = probs.topk(min(candidates, vocabulary), dim=-1)  # sorted, most likely first
    covered = top.sum(dim=-1) >= top_p
    groups = [(rows[covered], ids[covered], _keep_nucleus(top[covered], top_p))]
    if not bool(covered.all()):
        flat = rows[~covered]
        top, ids = probs[flat].sort(dim=-1, descending=True)
        groups.append((flat, ids, _keep_nucleus(top, top_p)))
    return groups


def _keep_nucleus(sorted_probs, top_p: float):
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = mass_above < top_p
    keep[:, 0] = True
    return sorted_probs * keep


class NucleusSampler:
    """A logits processor that draws the next token itself (temperature + top-p, ``nucleus``) and leaves only it.

    transformers' sampling path sorts the whole vocabulary for top-p and draws with ``torch.multinomial`` over it
    every step: on 2 CPU cores, for a batch of 32 rows over SmolLM2's 49 k tokens, that took about 120 ms and 60 ms
    a step, as long as the model's own decode step. Here: a softmax, a top-256 selection, an inverse-CDF draw over
    the candidates (one uniform number per row from torch's global generator, so ``torch.manual_seed`` reproduces
    it), and greedy decoding takes the drawn token. Same distribution; not the same draws as ``do_sample=True``.
    """

    def __init__(self, temperature: float, top_p: float):
        if temperature <= 0:
            raise ValueError(f"NucleusSampler needs a temperature above 0 (got {temperature})")
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        draws = torch.rand((scores.shape[0], 1), device=scores.device)
        chosen = draw_tokens(scores, self.temperature, self.top_p, draws)
        scores.fill_(float("-inf"))
        return scores.scatter_(-1, chosen, 0.0)


def draw_tokens(scores, temperature: float, top_p: float, draws):
    """One token per row of ``scores`` (rows x vocabulary logits), drawn from its ``nucleus`` by inverse CDF with
    that row's uniform number in ``draws`` (rows x 1); returns rows x 1 token ids."""
    import torch

    chosen = torch.empty((scores.shape[0], 1), dtype=torch.long, device=scores.device)
    for rows, ids, weights in nucleus(scores, temperature, top_p):
        cumulative = weights.cumsum(dim=-1)
        total = cumulative[:, -1:]
        # searchsorted(right=True) skips the CDF's flat steps, so a zero-weight token is never drawn; a draw
        # rounded up to the total goes to the last token that has weight.
        last = (cumulative < total).sum(dim=-1, keepdim=True)
        column = torch.minimum(torch.searchsorted(cumulative, draws[rows] * total, right=True), last)
        chosen[rows] = ids.gather(-1, column)
    return chosen


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without, torch emulates it ~100x slower."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return bool(set(line.split(":", 1)[-1].split()) & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: str) -> str:
    """``generation.precision`` for a device: auto is bf16 on CUDA and fp32 on CPU; bf16 on a CPU only if native."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown generation precision {precision!r} (auto, fp32 or bf16)")
    if precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
        raise EngineError("generation.precision 'bf16': this CPU has no native bf16 (AVX512-BF16 or AMX), torch "
                          "would emulate it about 100x slower than fp32: use fp32 or auto")
    return precision


def length_sorted_jobs(encoded: Sequence[list[int]], samples: int) -> list[tuple[int, int]]:
    """Every (request, sample) job, longest prompt first: the slowest batches start early and memory peaks at the
    beginning, not the end; equal lengths share batches, so padding stays small."""
    jobs = [(i, s) for i in range(len(encoded)) for s in range(samples)]
    jobs.sort(key=lambda job: (-len(encoded[job[0]]), job))
    return jobs


def encode_request(tokenizer, request: Request) -> list[int]:
    """A request as the model's chat template renders it, ready for the assistant's answer (shared by engines)."""
    encoded = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def eos_token_ids(tokenizer, configured: object) -> list[int]:
    """The tokenizer's EOS plus the model's configured ones (an int or a list): generation stops at any of them."""
    ids = {tokenizer.eos_token_id}
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[:position], True
    return tokens, False


def make_engine(name: str, model_dir: Path, device: str, batch_size: int, endpoint=None, *,
                compute_type: str = "float32", threads: int = 0, cache_dir: Path | None = None,
                precision: str = "auto") -> Engine:
    """``endpoint``: the ``openai`` engine's server section (``flywheel.config.EndpointConfig``); it serves its
    own model, so ``model_dir`` is not used there. ``compute_type``, ``threads`` and ``cache_dir`` (where converted
    models are kept; None: ``$FLYWHEEL_CT2_CACHE`` or ``~/.cache/flywheel/ctranslate2``) are the ``ctranslate2``
    engine's; ``precision`` (``resolve_precision``) the ``transformers`` engine's."""
    if name == "openai":
        if endpoint is None:
            raise ValueError("generation engine 'openai' needs an endpoint (generation.openai: base_url, model)")
        from flywheel.openai_engine import OpenAIEngine

        return OpenAIEngine.from_config(endpoint)
    if name == "transformers":
        return TransformersEngine(model_dir, device=device, batch_size=batch_size, precision=precision)
    if name == "ctranslate2":
        from flywheel.ct2_engine import CTranslate2Engine

        return CTranslate2Engine(model_dir, device=device, batch_size=batch_size, compute_type=compute_type,
                                 threads=threads, cache_dir=cache_dir)
    if name == "vllm":
        if device != "cuda":
            raise ValueError(f"generation engine 'vllm' needs a CUDA GPU (generation.device resolved to {device!r})")
        from flywheel.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, batch_size=batch_size)
    raise ValueError(f"unknown generation engine {name!r} (available: transformers, ctranslate2, vllm, openai)")


def close_engine(engine: object) -> None:
    """Free what an engine holds (a GPU engine its memory, an HTTP engine its connections) before the next stage
    loads a model into the same process; engines without resources have no ``close``."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()
