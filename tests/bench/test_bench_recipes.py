"""bench/recipes.py: training seeds parsed strictly, each variant summarized over its seeds, and rebuilt rows gated."""

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


def test_rebuilt_rows_pass_the_quality_gate_so_contaminated_prompts_are_not_trained_on(tmp_path):
    # Two train prompts answered well; one shares 25 consecutive words with a held-out prompt. The round's rows
    # (strategy "round") are read as they are; rows rebuilt by a strategy go through the recipe's quality suites,
    # which quarantine the contaminated prompt's row.
    import json

    import pandas as pd

    from flywheel.config import FlywheelConfig
    from flywheel.dataset import write_parquet
    from flywheel.prompts import Constraint, Prompt, save_prompts

    shared = " ".join(f"word{i}" for i in range(30))
    lower = Constraint(type="all_lowercase")
    train = [Prompt(id="clean", prompt="Describe a quiet harbour at dawn.", constraints=[lower]),
             Prompt(id="leaked", prompt=f"Describe this: {shared}.", constraints=[lower])]
    save_prompts(train, tmp_path / "train.jsonl")
    save_prompts([Prompt(id="e", prompt=f"Summarize this: {shared}.", constraints=[lower])], tmp_path / "eval.jsonl")
    samples = pd.DataFrame([{
        "row_id": f"{p.id}-s0", "prompt_id": p.id, "prompt": p.prompt, "sample_index": 0,
        "response": "boats rest in the harbour. gulls wait on the wall.", "n_tokens": 12, "finished": True,
        "score": 1.0, "passed": True, "checks": json.dumps([True]), "judge": "verifier", "verdict": "pass",
        "critique": "", "llm_verdict": "", "llm_critique": ""} for p in train])
    write_parquet(samples, tmp_path / "samples.parquet")
    record = {"prompts": {"train_path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl"),
                          "train": 2, "eval": 1, "round_prompts": 2},
              "judged": {"path": str(tmp_path / "samples.parquet")}}
    config = FlywheelConfig.model_validate({"strategy": {"name": "repair"}})

    tables = recipes.training_tables(config, "repair", record, tmp_path / "gx")
    assert [row["prompt_id"] for row in tables["sft"]] == ["clean"]

    write_parquet(samples, tmp_path / "round_sft.parquet")
    write_parquet(pd.DataFrame(columns=["row_id"]), tmp_path / "round_pairs.parquet")
    record["quality"] = {"clean": {"sft_path": str(tmp_path / "round_sft.parquet"),
                                   "pairs_path": str(tmp_path / "round_pairs.parquet")}}
    assert len(recipes.training_tables(config, "round", record, tmp_path / "gx2")["sft"]) == 2
