"""The vLLM generation engine: offline batched generation with vLLM's ``LLM`` on a CUDA GPU (the ``vllm`` extra).

vLLM schedules its own continuous batches (paged KV cache), so this engine hands it whole chunks of requests with
``n=samples`` each instead of padding batches itself. Prompts are rendered by the same ``encode_request`` as the
other engines and passed as token ids, so every engine sees identical prompts; completions are cut at the same EOS
ids and decoded by the same tokenizer, so ``text`` and ``n_tokens`` mean the same thing whichever engine made them.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

from flywheel.ct2_engine import _configured_eos
from flywheel.generation import (
    Completion, EngineError, Progress, Request, SamplingParams, _cut_at_eos, encode_request, eos_token_ids,
    length_sorted_jobs,
)

SEED_MODULUS = 2**63  # vLLM seeds a torch.Generator, which takes a non-negative 64-bit value


def request_seed(seed: int, request_index: int) -> int:
    """The sampling seed of one request: fixed by the run's seed and the request's position, so a rerun of the same
    requests draws the same samples however vLLM schedules them (its batches depend on timing and memory)."""
    return (seed * 1_000_003 + request_index) % SEED_MODULUS


class VLLMEngine:
    """Batched offline generation with ``vllm.LLM``; ``batch_size`` is requests handed to vLLM per call (progress
    is reported after each), not a padding batch: vLLM batches internally."""

    def __init__(self, model_dir: Path, *, batch_size: int = 256, gpu_memory_utilization: float = 0.85,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0):
        try:
            import vllm
        except ImportError as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise EngineError(f"generation engine 'vllm' needs the vllm package: install flywheel's 'vllm' extra "
                              f"on a CUDA machine (pip install 'flywheel[vllm]') ({reason})") from None
        from flywheel.models import check_model_dir, load_tokenizer, read_metadata, verify_model

        model_dir = Path(model_dir)
        if batch_size < 1:
            raise ValueError(f"vllm batch_size must be at least 1, got {batch_size}")
        check_model_dir(model_dir)
        if read_metadata(model_dir) is not None:
            verify_model(model_dir)  # never compute with weights that differ from what was recorded
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_ids = eos_token_ids(self.tokenizer, _configured_eos(model_dir))
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
        )

    def encode(self, request: Request) -> list[int]:
        return encode_request(self.tokenizer, request)

    def sampling_params(self, samples: int, params: SamplingParams, request_index: int):
        """vLLM's ``SamplingParams`` for one request, with the other engines' semantics."""
        sampling = params.temperature > 0
        return self._vllm.SamplingParams(
            n=samples,
            # temperature 0 is vLLM's greedy mode; top_p and the seed only matter when sampling.
            temperature=params.temperature if sampling else 0.0,
            top_p=params.top_p if sampling else 1.0,
            seed=request_seed(params.seed, request_index) if sampling else None,
            max_tokens=params.max_new_tokens,
            # The tokenizer's EOS alone misses models whose generation_config adds ids (e.g. an end-of-turn token).
            stop_token_ids=list(self.eos_ids),
            skip_special_tokens=True,
        )

    def generate(
        self, requests: Sequence[Request], samples: int, params: SamplingParams, progress: Progress | None = None
    ) -> list[Completion]:
        if self.llm is None:
            raise EngineError(f"vllm engine for {self.model_dir} was closed")
        encoded = [self.encode(r) for r in requests]
        # Longest prompts first, as in the other engines: each chunk holds similar lengths and memory peaks early.
        order = [i for i, _ in length_sorted_jobs(encoded, 1)]
        eos = set(self.eos_ids)
        results: list[Completion] = []
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            # A plain dict is vLLM's TokensPrompt (a TypedDict), whose import path has moved between releases.
            prompts = [{"prompt_token_ids": encoded[i]} for i in chunk]
            outputs = self.llm.generate(prompts, [self.sampling_params(samples, params, i) for i in chunk],
                                        use_tqdm=False)
            if len(outputs) != len(chunk):
                raise EngineError(f"vllm returned {len(outputs)} outputs for {len(chunk)} prompts ({self.model_dir})")
            for i, output in zip(chunk, outputs):
                for s, completion in enumerate(output.outputs):
                    # vLLM keeps the stop token in token_ids; cut it so n_tokens counts what the other engines count.
                    tokens, _ = _cut_at_eos(list(completion.token_ids), eos)
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    results.append(Completion(request_index=i, sample_index=s, text=text, n_tokens=len(tokens),
                                              finished=completion.finish_reason == "stop"))
            if progress:
                progress(len(chunk) * samples)
        results.sort(key=lambda c: (c.request_index, c.sample_index))
        return results

    def close(self) -> None:
        """Drop the model and its KV cache so the GPU is free for the next stage (training) in this process."""
        if self.llm is None:
            return
        self.llm = None
        gc.collect()  # the engine holds reference cycles; collect them before asking CUDA to release memory
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
        except ImportError:
            pass  # releases without these helpers tear down their process group when the engine is collected
        else:
            destroy_model_parallel()
            destroy_distributed_environment()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
