import pytest

from flywheel.generation import EngineError, SamplingParams, TransformersEngine, reserved_cache, user_request
from flywheel.prompts import default_prompts
from flywheel.shared_prompt import NAME, enable, shared_prompt_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(lively_model_dir) -> TransformersEngine:
    return TransformersEngine(lively_model_dir, device="cpu", batch_size=8)


def _batch(engine, prompts: list[str]):
    """Left-padded ids and mask of ``prompts`` and their positions, as the engine builds a pre-fill."""
    import torch

    encoded = [engine.encode(user_request(p)) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), engine.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("request_of_row", [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2]], ids=["whole", "uneven"])
def test_shared_prompts_attend_like_copies_of_the_prompt(engine, request_of_row):
    """Step by step, the shared cache gives the logits of the cache whose pre-fill is copied to every sample's row:
    through rows leaving, a prompt none of whose samples is left, and own parts outgrowing their reserve."""
    import torch

    model = engine.model
    ids, mask, positions = _batch(engine, [p.prompt for p in default_prompts()[:3]])
    expand = torch.tensor(request_of_row)
    steps = torch.randint(0, model.config.vocab_size, (8, len(request_of_row)),
                          generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.inference_mode():
        for name in ("copied", "shared"):
            cache = shared_prompt_cache(ids.shape[1]) if name == "shared" else reserved_cache(ids.shape[1] + 2)
            first = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
            rows, step_mask, step_position = expand, mask[expand], mask.sum(-1, keepdim=True)[expand]
            if name == "shared":
                cache.share(request_of_row, mask, reserve=2)
                assert cache.grid.dense == (request_of_row == [0, 0, 1, 1, 2, 2])
            else:
                cache.batch_select_indices(expand)
            outputs = [first[expand, -1]]
            for step in range(len(steps)):
                if step == 3:  # the first prompt's rows leave (the others are renumbered), and one of the second's
                    keep = torch.tensor([k for k, r in enumerate(request_of_row)
                                         if r != 0 and k != request_of_row.index(1)])
                    if name == "shared":
                        cache.keep_rows(keep)
                        assert cache.grid.prompts == 2 and not cache.grid.dense
                    else:
                        cache.batch_select_indices(keep)
                    rows, step_mask, step_position = rows[keep], step_mask[keep], step_position[keep]
                tokens = steps[step, :len(rows)][:, None]
                if name == "shared":
                    out = model(input_ids=tokens, position_ids=step_position, past_key_values=cache,
                                shared_prompt=cache)
                    assert cache.unattended() == 0
                else:
                    step_mask = torch.cat([step_mask, step_mask.new_ones((len(rows), 1))], dim=-1)
                    out = model(input_ids=tokens, attention_mask=step_mask, position_ids=step_position,
                                past_key_values=cache)
                outputs.append(out.logits[:, -1])
                step_position = step_position + 1
            logits[name] = (outputs, cache.get_seq_length())
    assert logits["shared"][1] == logits["copied"][1] == ids.shape[1] + len(steps)
    for shared, copied in zip(logits["shared"][0], logits["copied"][0]):
        assert shared.shape == copied.shape
        assert torch.allclose(shared, copied, atol=1e-5, rtol=0)
    # The comparison can fail: samples of one prompt differ by their own tokens.
    assert not torch.allclose(logits["shared"][0][2][0], logits["shared"][0][2][1])


def test_samples_sharing_a_prompt_decode_greedily_as_plain_generate(engine, monkeypatch):
    import flywheel.shared_prompt

    shared_batches = []
    real = flywheel.shared_prompt.shared_prompt_cache
    monkeypatch.setattr(flywheel.shared_prompt, "shared_prompt_cache",
                        lambda capacity: shared_batches.append(capacity) or real(capacity))
    requests = [user_request(p.prompt) for p in default_prompts()[:5]]
    greedy = SamplingParams(max_new_tokens=12)
    ours = [(c.text, c.n_tokens, c.finished) for c in engine.generate(requests, 3, greedy)]
    assert len(shared_batches) == 2  # 15 rows in batches of 8: both batches share prompts
    engine.decoder = "generate"
    try:
        reference = [(c.text, c.n_tokens, c.finished) for c in engine.generate(requests, 3, greedy)]
    finally:
        engine.decoder = "flywheel"
    assert ours == reference
    assert len({text for text, _, _ in ours}) > 1


def test_a_model_whose_attention_bypasses_the_interface_fails_loudly(lively_model_dir):
    engine = TransformersEngine(lively_model_dir, batch_size=4)
    assert engine.shared_prompts and engine.model.config._attn_implementation == NAME
    engine.model.set_attn_implementation("sdpa")  # attention no longer reaches shared_prompt_attention
    with pytest.raises(EngineError, match="attention does not go through transformers' attention interface"):
        engine.generate([user_request("Name a colour.")], 2, SamplingParams(max_new_tokens=4))
    engine.shared_prompts = False
    assert len(engine.generate([user_request("Name a colour.")], 2, SamplingParams(max_new_tokens=4))) == 2


def test_enable_wraps_sdpa_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not enable(eager) and eager.config._attn_implementation == "eager"
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert enable(sdpa) and sdpa.config._attn_implementation == NAME
    assert enable(sdpa)  # again: already enabled
