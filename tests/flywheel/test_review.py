import pandas as pd
import pytest

from flywheel.review import ReviewDecision, auto_decision, check_drop_ids, review_markdown, review_sample


def pairs_table(prompts: int, per_prompt: int) -> pd.DataFrame:
    rows = []
    for p in range(prompts):
        for k in range(per_prompt):
            rows.append({"row_id": f"p{p:02d}-r{k}", "prompt_id": f"p{p:02d}", "prompt": f"Prompt {p}",
                         "chosen": f"good answer {p}.{k}", "rejected": f"bad answer {p}.{k}",
                         "chosen_score": 1.0, "rejected_score": 0.5})
    return pd.DataFrame(rows)


TABLE = pairs_table(prompts=10, per_prompt=3)


def test_review_sample_is_reproducible_and_seeded():
    first = review_sample(TABLE, 5, seed=1)
    assert first == review_sample(TABLE, 5, seed=1)
    seeds = {tuple(r["row_id"] for r in review_sample(TABLE, 5, seed=s)) for s in range(6)}
    assert len(seeds) > 1  # the seed matters


@pytest.mark.parametrize("size,expected", [(1, 1), (4, 4), (10, 10), (50, 10)])
def test_review_sample_size_is_bounded_and_one_row_per_prompt(size, expected):
    sample = review_sample(TABLE, size, seed=0)
    assert len(sample) == expected
    prompt_ids = [r["prompt_id"] for r in sample]
    assert len(set(prompt_ids)) == len(prompt_ids)
    known = set(TABLE["row_id"])
    assert all(r["row_id"] in known for r in sample)
    assert [r["row_id"] for r in sample] == sorted(r["row_id"] for r in sample)
    assert set(sample[0]) == set(TABLE.columns)  # whole rows, every column


def test_review_sample_of_a_single_prompt_and_of_nothing():
    single = pairs_table(prompts=1, per_prompt=5)
    assert len(review_sample(single, 8, seed=3)) == 1
    assert review_sample(TABLE.iloc[:0], 8, seed=0) == []


def test_check_drop_ids():
    known = {"a-pair", "b-pair"}
    check_drop_ids([], known)
    check_drop_ids(["a-pair"], known)
    with pytest.raises(ValueError, match="unknown row ids: c-pair, z-pair"):
        check_drop_ids(["z-pair", "a-pair", "c-pair"], known)


def test_review_markdown_shows_stats_and_every_sampled_row():
    sample = review_sample(TABLE, 3, seed=0)
    stats = {"pairs": 30, "pass_rate": 0.42, "quarantined": 2}
    page = review_markdown("round-0003", stats, sample, ["chosen", "rejected"])
    assert page.startswith("# Review round-0003")
    assert "| pairs | 30 |" in page
    assert "| pass_rate | 0.42 |" in page
    assert "| quarantined | 2 |" in page
    assert "## Sample (3 rows)" in page
    for row in sample:
        assert f"### `{row['row_id']}`" in page
        assert f"> {row['chosen']}" in page and f"> {row['rejected']}" in page
    assert "**chosen** (score 1.0):" in page and "**rejected** (score 0.5):" in page
    assert "flywheel review" in page


def test_review_markdown_quotes_multiline_text_and_skips_missing_columns():
    sample = [{"row_id": "x-sft0", "prompt": "line one\nline two", "completion": "a\nb", "score": 0.75}]
    page = review_markdown("round-0001", {}, sample, ["completion", "chosen"])
    assert "**Prompt:** line one\n> line two" in page
    assert "**completion** (score 0.75):\n> a\n> b" in page
    assert "**chosen**" not in page


def test_auto_decision():
    decision = auto_decision(["a", "b"])
    assert decision.approved and decision.mode == "auto" and decision.reviewer == "policy:auto"
    assert decision.sample_ids == ["a", "b"] and decision.dropped_ids == []
    assert decision.decided_at.startswith("20")
    with pytest.raises(Exception):
        ReviewDecision(approved=True, mode="robot", reviewer="x")
