"""bench/recipes.py's training seeds: parsed strictly, and each variant summarized over its seeds."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import recipes  # noqa: E402


def test_seeds_default_to_the_recipes_and_are_parsed_strictly():
    assert recipes.parse_seeds(None, 7) == [7]
    assert recipes.parse_seeds("0,1, 2", 7) == [0, 1, 2]
    for bad in ("", "0,x", "1,1"):
        with pytest.raises(SystemExit, match="--seeds"):
            recipes.parse_seeds(bad, 0)


def test_seed_summary_gives_each_variants_mean_range_and_gain_over_the_champion():
    rows = [{"variant": "champion v1", "seed": None, "instr_acc": 0.475},
            {"variant": "sft", "seed": 0, "instr_acc": 0.495}, {"variant": "sft", "seed": 1, "instr_acc": 0.492},
            {"variant": "sft", "seed": 2, "instr_acc": 0.513}, {"variant": "kl", "seed": 0, "instr_acc": 0.500}]
    sft, kl = recipes.seed_summary(rows)
    assert (sft["variant"], sft["seeds"], sft["low"], sft["high"]) == ("sft", 3, 0.492, 0.513)
    assert sft["mean"] == pytest.approx(0.5) and sft["mean_gain"] == pytest.approx(0.025)
    assert sft["spread"] == pytest.approx(0.021)
    assert (kl["variant"], kl["seeds"], kl["spread"]) == ("kl", 1, 0.0)
    assert kl["mean_gain"] == pytest.approx(0.025)
