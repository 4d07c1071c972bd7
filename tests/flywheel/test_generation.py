import pytest

from flywheel.generation import (
    EngineError,
    SamplingParams,
    TransformersEngine,
    _cut_at_eos,
    make_engine,
    user_request,
)
from flywheel.prompts import default_prompts

MAX_NEW = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(lively_model_dir) -> TransformersEngine:
    return TransformersEngine(lively_model_dir, device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def requests_():
    # Prompts of different lengths, so the engine's length sort really reorders the work.
    by_length = sorted((p.prompt for p in default_prompts()[:8]), key=len)
    mixed = [text for pair in zip(by_length[:4], by_length[::-1][:4]) for text in pair]
    return [user_request(text) for text in mixed]


GREEDY = SamplingParams(max_new_tokens=MAX_NEW)
SAMPLED = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=3)


def _texts(completions):
    return [c.text for c in completions]


def test_completions_come_back_in_request_then_sample_order(engine, requests_):
    assert len({len(engine.encode(r)) for r in requests_}) > 1
    completions = engine.generate(requests_[:5], 3, SAMPLED)
    assert len(completions) == 15
    assert [(c.request_index, c.sample_index) for c in completions] == [(i, s) for i in range(5) for s in range(3)]
    for c in completions:
        assert 0 <= c.n_tokens <= MAX_NEW
        assert c.finished == (c.n_tokens < MAX_NEW)  # no EOS means it ran to the limit
    # Several samples of one prompt are separate draws, not copies.
    assert len(set(_texts(completions[:3]))) > 1


def test_greedy_is_deterministic_and_independent_of_batching(engine, requests_):
    engine.batch_size = 8
    first = engine.generate(requests_, 1, GREEDY)
    second = engine.generate(requests_, 1, GREEDY)
    engine.batch_size = 1
    try:
        one_by_one = engine.generate(requests_, 1, GREEDY)
    finally:
        engine.batch_size = 8
    texts = _texts(first)
    assert len(set(texts)) == len(texts) and all(texts), "greedy texts should differ per prompt"
    assert _texts(second) == texts
    assert _texts(one_by_one) == texts
    assert [c.n_tokens for c in one_by_one] == [c.n_tokens for c in first]
    # Each batched answer belongs to its own request: the same as asking that request alone.
    alone = engine.generate([requests_[5]], 1, GREEDY)
    assert alone[0].request_index == 0 and alone[0].text == texts[5]


def test_greedy_ignores_the_seed(engine, requests_):
    a = engine.generate(requests_[:3], 1, SamplingParams(max_new_tokens=MAX_NEW, seed=1))
    b = engine.generate(requests_[:3], 1, SamplingParams(max_new_tokens=MAX_NEW, seed=2))
    assert _texts(a) == _texts(b)


def test_sampling_is_reproducible_with_a_seed(engine, requests_):
    first = engine.generate(requests_[:4], 4, SAMPLED)
    again = engine.generate(requests_[:4], 4, SAMPLED)
    other_seed = engine.generate(requests_[:4], 4, SAMPLED.model_copy(update={"seed": 4}))
    greedy = engine.generate(requests_[:4], 1, GREEDY)
    assert _texts(first) == _texts(again)
    assert _texts(first) != _texts(other_seed)
    assert [c.text for c in first if c.sample_index == 0] != _texts(greedy)


def test_progress_counts_every_sample(engine, requests_):
    calls: list[int] = []
    engine.batch_size = 3
    try:
        completions = engine.generate(requests_[:5], 2, SAMPLED, progress=calls.append)
    finally:
        engine.batch_size = 8
    assert calls == [3, 3, 3, 1]
    assert sum(calls) == len(completions) == 10


def test_finished_only_when_eos_was_produced(lively_model_dir, requests_):
    import torch

    engine = TransformersEngine(lively_model_dir, batch_size=8)
    truncated = engine.generate(requests_, 2, SamplingParams(max_new_tokens=1, temperature=1.0, seed=0))
    assert sum(c.finished for c in truncated) <= 2  # EOS is one token of ~1200: most samples hit the limit
    assert all(c.n_tokens == 1 for c in truncated if not c.finished)
    assert all(c.n_tokens == 0 and c.text == "" for c in truncated if c.finished)

    # Make a token the greedy answer produces mid-way an EOS: generation must stop there and say so.
    ids = engine.encode(requests_[0])
    with torch.inference_mode():
        out = engine.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id)
    tokens = out[0, len(ids):].tolist()
    cut = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    before = engine.generate(requests_[:1], 1, GREEDY)[0]
    assert before.finished is False and before.n_tokens == MAX_NEW
    engine.model.generation_config.eos_token_id = [engine.tokenizer.eos_token_id, tokens[cut]]
    after = engine.generate(requests_[:1], 1, GREEDY)[0]
    assert after.finished is True
    assert after.n_tokens == cut
    assert after.text == engine.tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
    assert before.text.startswith(after.text)


def test_cut_at_eos():
    assert _cut_at_eos([5, 6, 2, 7, 2], {2}) == ([5, 6], True)
    assert _cut_at_eos([5, 6, 7], {2}) == ([5, 6, 7], False)
    assert _cut_at_eos([3, 5], {2, 3}) == ([], True)


def test_make_engine(lively_model_dir):
    assert isinstance(make_engine("transformers", lively_model_dir, "cpu", 4), TransformersEngine)
    with pytest.raises(ValueError, match="unknown generation engine 'sglang'.*ctranslate2, vllm"):
        make_engine("sglang", lively_model_dir, "cpu", 4)
    with pytest.raises(ValueError, match="'vllm' needs a CUDA GPU"):
        make_engine("vllm", lively_model_dir, "cpu", 4)


def test_encode_uses_the_chat_template(engine):
    ids = engine.encode(user_request("hello there"))
    text = engine.tokenizer.decode(ids)
    assert text == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


def _answers(completions):
    return [(c.text, c.n_tokens, c.finished) for c in completions]


def _reference(engine, requests, samples, params):
    engine.decoder = "generate"
    try:
        return engine.generate(requests, samples, params)
    finally:
        engine.decoder = "flywheel"


@pytest.fixture
def copied_prompts(engine):
    """Each sample's row gets its own copy of the prompt's cache: the loop's attention is then sdpa's over the
    same values as plain generate's, so sampled answers are identical too. Shared prompts (the default,
    flywheel.shared_prompt) add the same terms in another order: logits equal to about 1e-7, which can move a draw
    that lands on a boundary between two tokens, so sampled comparisons with the reference use copies; greedy
    ones run both."""
    engine.shared_prompts = False
    yield engine
    engine.shared_prompts = True


def test_decode_loop_equals_plain_generate(engine, requests_):
    # Batches of 8 rows over 3 samples per request: requests split across batch boundaries too.
    engine.batch_size = 8
    assert _answers(engine.generate(requests_[:5], 3, GREEDY)) == _answers(_reference(engine, requests_[:5], 3, GREEDY))


def test_decode_loop_samples_as_plain_generate(copied_prompts, requests_):
    engine = copied_prompts
    engine.batch_size = 8
    assert _answers(engine.generate(requests_[:5], 3, GREEDY)) == _answers(_reference(engine, requests_[:5], 3, GREEDY))
    sampled = engine.generate(requests_[:5], 3, SAMPLED)
    assert _answers(sampled) == _answers(_reference(engine, requests_[:5], 3, SAMPLED))
    assert len(set(_texts(sampled))) > 5


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "copied"])
def test_answers_longer_than_the_reserve_grow_the_cache_and_stay_those_of_plain_generate(engine, requests_,
                                                                                       monkeypatch, shared):
    import flywheel.generation

    monkeypatch.setattr(flywheel.generation, "RESERVE_STEP", 3)  # a dozen new tokens grow the cache four times
    monkeypatch.setattr(engine, "shared_prompts", shared)
    params = GREEDY if shared else SAMPLED
    assert _answers(engine.generate(requests_[:3], 2, params)) == _answers(_reference(engine, requests_[:3], 2,
                                                                                      params))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "copied"])
def test_rows_leave_the_batch_at_eos_and_answers_stay_those_of_plain_generate(lively_model_dir, requests_, shared):
    engine = TransformersEngine(lively_model_dir, batch_size=8)
    engine.shared_prompts = shared
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0 if shared else 1.0, top_p=0.9, seed=5)
    # Every 8th token id ends an answer, so rows end at different steps.
    vocabulary = engine.model.get_output_embeddings().weight.shape[0]
    engine.model.generation_config.eos_token_id = [engine.tokenizer.eos_token_id, *range(3, vocabulary, 8)]
    calls: list[tuple[int, int]] = []  # (rows, tokens) of every forward pass
    hook = engine.model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        ours = engine.generate(requests_, 2, params)
    finally:
        hook.remove()
    ended = [c for c in ours if c.finished]
    assert 0 < len(ended) < len(ours) and len({c.n_tokens for c in ended}) > 2
    # Each batch pre-fills its 4 distinct requests once; decode steps start with 8 rows and lose rows as they end.
    prefills = [rows for rows, tokens in calls if tokens > 1]
    steps = [rows for rows, tokens in calls if tokens == 1]
    assert prefills == [4, 4]
    assert max(steps) == 8 and min(steps) < 8
    assert _answers(ours) == _answers(_reference(engine, requests_, 2, params))
    assert all(c.n_tokens <= MAX_NEW for c in ours)
    engine.decoder = "beam"
    with pytest.raises(EngineError, match="unknown decoder 'beam'"):
        engine.generate(requests_[:1], 1, GREEDY)


def test_reserved_cache_attends_like_the_dynamic_cache(engine):
    import torch
    from transformers import DynamicCache

    from flywheel.generation import reserved_cache

    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    step = torch.tensor([[12], [13]])
    outputs = {}
    # Capacity 2 is exceeded by the pre-fill and again by the next token: growing must keep what is cached.
    for name, cache in [("dynamic", DynamicCache()), ("reserved", reserved_cache(6)), ("grown", reserved_cache(2))]:
        with torch.inference_mode():
            first = engine.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            cache.batch_select_indices(torch.tensor([1, 1, 0]))
            second = engine.model(input_ids=step[[1, 1, 0]], attention_mask=torch.cat(
                [mask[[1, 1, 0]], torch.ones(3, 1, dtype=torch.long)], dim=-1), past_key_values=cache,
                use_cache=True).logits
        outputs[name] = (first, second, cache.get_seq_length())
    for name in ("reserved", "grown"):
        assert torch.equal(outputs[name][0], outputs["dynamic"][0])
        assert torch.equal(outputs[name][1], outputs["dynamic"][1])
        assert outputs[name][2] == 5
    assert torch.equal(outputs["dynamic"][1][0], outputs["dynamic"][1][1])


def test_precision_resolves_per_device(monkeypatch):
    import flywheel.generation as generation
    from flywheel.generation import EngineError, resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cuda") == "bf16"
    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(EngineError, match="no native bf16 .* use fp32 or auto"):
        resolve_precision("bf16", "cpu")
    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown generation precision"):
        resolve_precision("fp8", "cpu")


def test_bf16_engine_on_a_cpu_with_native_bf16(lively_model_dir, requests_, monkeypatch):
    import torch

    import flywheel.generation as generation

    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: True)  # the tiny model is cheap even if emulated
    engine = make_engine("transformers", lively_model_dir, "cpu", 8, precision="bf16")
    assert engine.precision == "bf16" and next(engine.model.parameters()).dtype == torch.bfloat16
    assert not engine.shared_prompts and engine.model.config._attn_implementation == "sdpa"  # fp32 only
    completions = engine.generate(requests_[:3], 1, GREEDY)
    assert len(completions) == 3 and all(c.n_tokens > 0 for c in completions)
    fp32 = make_engine("transformers", lively_model_dir, "cpu", 8)
    assert next(fp32.model.parameters()).dtype == torch.float32 and fp32.shared_prompts


def test_precision_is_the_transformers_engines():
    from flywheel.config import ConfigError, parse_config

    assert parse_config({"generation": {"precision": "bf16"}}).generation.precision == "bf16"
    with pytest.raises(ConfigError, match="precision 'bf16' is the transformers engine's"):
        parse_config({"generation": {"engine": "ctranslate2", "precision": "bf16"}})


def _warped(scores, temperature, top_p):
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warped = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    return torch.softmax(warped, dim=-1)


def _nucleus_distribution(scores, temperature, top_p, candidates):
    """``nucleus`` as one batch x vocabulary probability table (rows sum to 1): what the sampler draws from."""
    import torch

    from flywheel.generation import nucleus

    table = torch.zeros(scores.shape, dtype=torch.float32)
    for rows, ids, weights in nucleus(scores, temperature, top_p, candidates):
        table[rows] = table[rows].scatter(-1, ids, weights)
    return table / table.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize(("temperature", "top_p"), [(0.8, 0.95), (1.0, 0.5), (1.0, 1.0), (0.7, 0.99)])
def test_nucleus_is_the_distribution_of_transformers_warpers(temperature, top_p):
    import torch

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 3000, generator=generator)
    scores[:4] *= 15  # peaked rows (nucleus within the candidates) next to near-flat ones (sorted in full)
    expected = _warped(scores, temperature, top_p)
    got = _nucleus_distribution(scores, temperature, top_p, candidates=64)
    assert torch.equal(got > 0, expected > 0)
    assert torch.allclose(got, expected, atol=1e-6)


def test_nucleus_sorts_only_the_rows_whose_candidates_miss_the_mass():
    import torch

    from flywheel.generation import nucleus

    scores = torch.zeros(3, 1000)
    scores[0, 7] = 30.0  # one token holds nearly all the mass
    scores[2, :5] = 30.0  # five do
    groups = nucleus(scores, 1.0, 0.9, candidates=16)
    assert [g[0].tolist() for g in groups] == [[0, 2], [1]]
    assert groups[0][1].shape == (2, 16) and groups[1][1].shape == (1, 1000)
    kept = [(weights > 0).sum(-1).tolist() for _, _, weights in groups]
    assert kept == [[1, 5], [900]]  # the flat row keeps 90% of its 1000 equal tokens


def test_nucleus_sampler_draws_from_the_nucleus_in_proportion():
    import torch

    from flywheel.generation import NucleusSampler

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # top_p 0.9 keeps the first three
    torch.manual_seed(0)
    out = NucleusSampler(1.0, 0.9)(None, logits.repeat(20000, 1))
    assert torch.isinf(out).sum(-1).eq(3).all() and (out.max(-1).values == 0).all()  # one token left per row
    counts = torch.bincount(out.argmax(-1), minlength=4).float() / 20000
    assert counts[3] == 0
    assert torch.allclose(counts[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.015)


def test_nucleus_sampler_refuses_greedy():
    from flywheel.generation import NucleusSampler

    with pytest.raises(ValueError, match="temperature above 0"):
        NucleusSampler(0.0, 0.9)


def test_fast_sampling_and_transformers_sampling_are_both_reproducible(engine, requests_):
    params = SAMPLED.model_copy(update={"temperature": 0.8, "top_p": 0.9})
    fast = engine.generate(requests_[:4], 3, params)
    engine.fast_sampling, engine.decoder = False, "generate"
    try:
        warpers = engine.generate(requests_[:4], 3, params)
        warpers_again = engine.generate(requests_[:4], 3, params)
    finally:
        engine.fast_sampling, engine.decoder = True, "flywheel"
    assert _texts(fast) == _texts(engine.generate(requests_[:4], 3, params))
    assert _texts(warpers) == _texts(warpers_again)
    assert len(set(_texts(fast))) > 3 and len(set(_texts(warpers))) > 3
    assert all(c.n_tokens <= MAX_NEW for c in fast)
