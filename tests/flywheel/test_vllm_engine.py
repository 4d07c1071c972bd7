"""The vLLM engine against a fake ``vllm`` module (vLLM needs a CUDA GPU): what it hands vLLM, and how it reads
vLLM's outputs back. The tiny model supplies the real tokenizer and chat template."""

import sys
import types
from dataclasses import dataclass, field

import pytest

from flywheel.generation import EngineError, Request, SamplingParams, encode_request, eos_token_ids, user_request
from flywheel.models import load_tokenizer
from flywheel.vllm_engine import VLLMEngine, request_seed

MAX_NEW = 6


@dataclass
class FakeCompletionOutput:  # the fields of vllm.outputs.CompletionOutput the engine reads
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class FakeRequestOutput:  # vllm.outputs.RequestOutput
    prompt_token_ids: list[int]
    outputs: list[FakeCompletionOutput]


@dataclass
class Recorder:
    llm_kwargs: list[dict] = field(default_factory=list)
    calls: list[tuple[list, list]] = field(default_factory=list)  # (prompts, sampling params) per generate call


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def answer_ids(tokenizer, sample: int) -> list[int]:
    return tokenizer.encode(f"answer {sample}", add_special_tokens=False)


@pytest.fixture
def fake_vllm(monkeypatch, tokenizer) -> Recorder:
    """A ``vllm`` module whose LLM answers sample s with "answer s": even samples end with EOS (finish "stop"),
    odd ones repeat the answer up to max_tokens (finish "length"), as vLLM reports them."""
    recorder = Recorder()
    eos = tokenizer.eos_token_id

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            recorder.llm_kwargs.append(kwargs)

        def generate(self, prompts, sampling_params, *, use_tqdm=True):
            assert len(prompts) == len(sampling_params)
            recorder.calls.append((prompts, sampling_params))
            results = []
            for prompt, sp in zip(prompts, sampling_params):
                outputs = []
                for s in range(sp.n):
                    body = answer_ids(tokenizer, s)
                    if s % 2 == 0:
                        ids, reason = body + [eos], "stop"  # vLLM keeps the stop token in token_ids
                    else:
                        ids, reason = (body * sp.max_tokens)[: sp.max_tokens], "length"
                    outputs.append(FakeCompletionOutput(index=s, text="(vllm's own text)", token_ids=ids,
                                                        finish_reason=reason))
                results.append(FakeRequestOutput(prompt_token_ids=prompt["prompt_token_ids"], outputs=outputs))
            return results

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return recorder


def _requests() -> list[Request]:
    return [user_request("hi"), user_request("write a short note about the weather in lowercase letters"),
            Request(messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "bread?"}))]


def test_constructor_passes_model_and_memory_settings(fake_vllm, tiny_model_dir):
    VLLMEngine(tiny_model_dir, gpu_memory_utilization=0.5, dtype="bfloat16", max_model_len=512, seed=7)
    assert fake_vllm.llm_kwargs == [dict(model=str(tiny_model_dir), tokenizer=str(tiny_model_dir), dtype="bfloat16",
                                         gpu_memory_utilization=0.5, max_model_len=512, seed=7)]


def test_prompts_are_the_chat_template_token_ids(fake_vllm, tiny_model_dir, tokenizer):
    requests = _requests()
    VLLMEngine(tiny_model_dir).generate(requests, 1, SamplingParams(max_new_tokens=MAX_NEW))
    [(prompts, _)] = fake_vllm.calls
    expected = [encode_request(tokenizer, r) for r in requests]
    assert len({len(e) for e in expected}) == 3  # lengths differ, so the longest-first order is visible
    # Longest prompt first, each exactly as the other engines render it.
    assert prompts == [{"prompt_token_ids": e} for e in sorted(expected, key=len, reverse=True)]


def test_greedy_sampling_params(fake_vllm, tiny_model_dir, tokenizer):
    VLLMEngine(tiny_model_dir).generate(_requests(), 3, SamplingParams(max_new_tokens=MAX_NEW, top_p=0.5, seed=4))
    [(_, params)] = fake_vllm.calls
    stop = eos_token_ids(tokenizer, tokenizer.eos_token_id)
    for sp in params:
        assert (sp.n, sp.temperature, sp.top_p, sp.seed, sp.max_tokens) == (3, 0.0, 1.0, None, MAX_NEW)
        assert sp.stop_token_ids == stop and sp.skip_special_tokens is True


def test_sampled_params_carry_a_per_request_seed(fake_vllm, tiny_model_dir, tokenizer):
    engine = VLLMEngine(tiny_model_dir)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.7, top_p=0.9, seed=3)
    engine.generate(_requests(), 2, params)
    engine.generate(_requests(), 2, params)
    engine.generate(_requests(), 2, params.model_copy(update={"seed": 4}))
    first, again, other = [
        {tuple(prompt["prompt_token_ids"]): sp for prompt, sp in zip(*call)} for call in fake_vllm.calls
    ]
    for sp in first.values():
        assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens) == (2, 0.7, 0.9, MAX_NEW)
    seeds = {key: sp.seed for key, sp in first.items()}
    assert len(set(seeds.values())) == 3  # one seed per request
    assert {key: sp.seed for key, sp in again.items()} == seeds  # a rerun draws the same samples
    assert not set(sp.seed for sp in other.values()) & set(seeds.values())  # another run seed, other samples
    # Seeds follow the request's index in the call, not the (length-sorted) order vLLM is handed.
    assert seeds == {tuple(encode_request(tokenizer, r)): request_seed(3, i) for i, r in enumerate(_requests())}


def test_completions_order_finished_and_token_counts(fake_vllm, tiny_model_dir, tokenizer):
    engine = VLLMEngine(tiny_model_dir, batch_size=2)
    completions = engine.generate(_requests(), 3, SamplingParams(max_new_tokens=MAX_NEW))
    assert [(c.request_index, c.sample_index) for c in completions] == [(i, s) for i in range(3) for s in range(3)]
    for c in completions:
        body = answer_ids(tokenizer, c.sample_index)
        if c.sample_index % 2 == 0:  # stopped at EOS: the EOS is neither counted nor in the text
            assert (c.finished, c.n_tokens) == (True, len(body))
            assert c.text == tokenizer.decode(body, skip_special_tokens=True).strip() == f"answer {c.sample_index}"
        else:  # ran into max_tokens
            assert (c.finished, c.n_tokens) == (False, MAX_NEW)
            assert c.text.startswith(f"answer {c.sample_index}")


def test_progress_counts_every_sample_per_chunk(fake_vllm, tiny_model_dir):
    seen: list[int] = []
    engine = VLLMEngine(tiny_model_dir, batch_size=2)
    completions = engine.generate(_requests(), 2, SamplingParams(max_new_tokens=MAX_NEW), progress=seen.append)
    assert [len(prompts) for prompts, _ in fake_vllm.calls] == [2, 1]  # chunks of batch_size requests
    assert seen == [4, 2] and sum(seen) == len(completions) == 6


def test_missing_vllm_is_a_one_line_engine_error(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(EngineError, match=r"install flywheel's 'vllm' extra on a CUDA machine") as caught:
        VLLMEngine(tiny_model_dir)
    assert "\n" not in str(caught.value)


def test_close_releases_the_llm(fake_vllm, tiny_model_dir):
    engine = VLLMEngine(tiny_model_dir)
    engine.close()
    engine.close()  # idempotent
    assert engine.llm is None
    with pytest.raises(EngineError, match="closed"):
        engine.generate(_requests(), 1, SamplingParams(max_new_tokens=MAX_NEW))
