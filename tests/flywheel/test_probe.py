import math

import pytest

from flywheel.probe import PROBE_TEXTS, perplexity


def test_perplexity_is_finite_and_reflects_the_model(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = perplexity(tiny_model_dir, PROBE_TEXTS[:4])
    assert math.isfinite(base) and base > 1
    # A random model is near-uniform: its perplexity sits near the vocabulary size, not far above it.
    vocab = AutoTokenizer.from_pretrained(tiny_model_dir).vocab_size
    assert base < 3 * vocab
    damaged = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        damaged.lm_head.weight.mul_(25.0)  # sharpen random logits: confidently wrong, so perplexity rises
    damaged.save_pretrained(tmp_path / "damaged")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "damaged")
    assert perplexity(tmp_path / "damaged", PROBE_TEXTS[:4]) > base * 1.5


def test_perplexity_needs_texts(tiny_model_dir):
    with pytest.raises(ValueError, match="at least one text"):
        perplexity(tiny_model_dir, [])
