import pandas as pd
import pytest

import json

from flywheel.quality import ExpectationOutcome, QualityReport, TableReport
from flywheel.review import (
    ReviewDecision, annotate_strata, auto_decision, automatic_checks, check_drop_ids, review_markdown, review_sample,
    strata_counts, timeout_decision,
)


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


@pytest.mark.parametrize("size,expected", [(1, 1), (4, 4), (10, 10), (12, 12), (50, 30)])
def test_review_sample_size_is_bounded_and_spreads_over_prompts(size, expected):
    sample = review_sample(TABLE, size, seed=0)
    assert len(sample) == expected
    prompt_ids = [r["prompt_id"] for r in sample]
    # every prompt is shown once before any is shown twice
    assert len(set(prompt_ids)) == min(len(prompt_ids), 10)
    assert len({r["row_id"] for r in sample}) == len(sample)
    known = set(TABLE["row_id"])
    assert all(r["row_id"] in known for r in sample)
    assert [r["row_id"] for r in sample] == sorted(r["row_id"] for r in sample)
    assert set(sample[0]) == set(TABLE.columns)  # whole rows, every column


def test_review_sample_of_a_single_prompt_and_of_nothing():
    single = pairs_table(prompts=1, per_prompt=5)
    assert len(review_sample(single, 3, seed=3)) == 3
    assert len(review_sample(single, 8, seed=3)) == 5
    assert review_sample(TABLE.iloc[:0], 8, seed=0) == []


def stratified_table() -> pd.DataFrame:
    """Uneven strata: a big passing one, a single failing row, a type that only fails, one that only passes."""
    layout = {("word_count_max", "pass"): 12, ("word_count_max", "fail"): 1, ("title", "fail"): 4,
              ("all_lowercase", "pass"): 2, ("json_format", "fail"): 3}
    rows = []
    for (kind, verdict), count in layout.items():
        for k in range(count):
            rows.append({"row_id": f"{kind}-{verdict}-{k:02d}", "prompt_id": f"{kind}-{verdict}-p{k // 2}",
                         "prompt": "p", "completion": "c", "score": 1.0 if verdict == "pass" else 0.5,
                         "instruction_type": kind, "verdict": verdict})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("size", [5, 6, 9])
def test_review_sample_covers_every_stratum_when_the_size_allows(seed, size):
    table = stratified_table()
    strata = {(r.instruction_type, r.verdict) for r in table.itertuples()}
    sample = review_sample(table, size, seed=seed)
    assert len(sample) == size
    assert {(r["instruction_type"], r["verdict"]) for r in sample} == strata
    assert sample == review_sample(table, size, seed=seed)


@pytest.mark.parametrize("seed", range(8))
def test_a_sample_smaller_than_the_strata_still_shows_both_verdicts(seed):
    sample = review_sample(stratified_table(), 2, seed=seed)
    assert sorted(r["verdict"] for r in sample) == ["fail", "pass"]


def test_which_strata_a_small_sample_shows_depends_on_the_seed():
    shown = {tuple(sorted(r["instruction_type"] for r in review_sample(stratified_table(), 2, seed=s)))
             for s in range(12)}
    assert len(shown) > 1


def judged_samples() -> pd.DataFrame:
    rows = [
        ("a", 0, "A fine answer", True, {"title": True, "word_count_max": True}),
        ("a", 1, "a poor answer", False, {"title": False, "word_count_max": True}),
        ("b", 0, "partly right", False, {"no_commas": False}),
        ("b", 1, "wrong", False, {"no_commas": False}),
    ]
    return pd.DataFrame([{"row_id": f"{p}-s{i}", "prompt_id": p, "prompt": p, "sample_index": i, "response": text,
                          "score": 1.0 if ok else 0.5, "passed": ok, "checks": json.dumps(checks)}
                         for p, i, text, ok, checks in rows])


def test_annotate_strata_reads_type_and_verdict_of_the_trained_text():
    pairs = pd.DataFrame([
        {"row_id": "a-pair", "prompt_id": "a", "prompt": "a", "chosen": "A fine answer", "rejected": "a poor answer",
         "chosen_score": 1.0, "rejected_score": 0.5},
        {"row_id": "b-pair", "prompt_id": "b", "prompt": "b", "chosen": "partly right", "rejected": "wrong",
         "chosen_score": 0.5, "rejected_score": 0.0},
        # no judged sample for this prompt: type unknown, verdict from the score
        {"row_id": "c-pair", "prompt_id": "c", "prompt": "c", "chosen": "x", "rejected": "y",
         "chosen_score": 1.0, "rejected_score": 0.0},
    ])
    annotated = annotate_strata(pairs, judged_samples(), "pairs")
    assert list(annotated["instruction_type"]) == ["title", "no_commas", "unknown"]
    assert list(annotated["verdict"]) == ["pass", "fail", "pass"]
    assert strata_counts(annotated) == {"no_commas / fail": 1, "title / pass": 1, "unknown / pass": 1}
    sft = pd.DataFrame([{"row_id": "a-sft1", "prompt_id": "a", "prompt": "a", "completion": "a poor answer",
                         "score": 0.5}])
    assert list(annotate_strata(sft, judged_samples(), "sft")["verdict"]) == ["fail"]
    assert annotate_strata(sft.iloc[:0], judged_samples(), "sft").empty



def test_annotate_strata_prefers_the_deciding_judges_verdict():
    samples = judged_samples().assign(verdict=["fail", "pass", "fail", "fail"])  # an LLM judge overruled the score
    sft = pd.DataFrame([{"row_id": "a-sft0", "prompt_id": "a", "prompt": "a", "completion": "A fine answer",
                         "score": 1.0},
                        {"row_id": "a-sft1", "prompt_id": "a", "prompt": "a", "completion": "a poor answer",
                         "score": 0.5}])
    assert list(annotate_strata(sft, samples, "sft")["verdict"]) == ["fail", "pass"]


def quality_report(failed_rows: int = 0, passed: bool = True, errors: list[str] | None = None) -> QualityReport:
    outcome = ExpectationOutcome(expectation="expect_column_value_lengths_to_be_between", column="chosen",
                                 success=failed_rows == 0, unexpected_count=failed_rows)
    table = TableReport(table="pairs", rows=20, failed_rows=failed_rows, success=failed_rows == 0,
                        expectations=[outcome])
    return QualityReport(tables=[table], total_rows=20, failed_rows=failed_rows, failed_fraction=failed_rows / 20,
                         max_failed_fraction=0.5, passed=passed, gx_run_id="r", errors=errors or [])


def test_automatic_checks():
    assert automatic_checks(quality_report())[0]
    ok, why = automatic_checks(quality_report(failed_rows=2))
    assert not ok and "2 row(s) failed expectations" in why and "expect_column_value_lengths_to_be_between" in why
    assert not automatic_checks(quality_report(errors=["pairs: boom"]))[0]
    assert not automatic_checks(quality_report(failed_rows=15, passed=False))[0]


@pytest.mark.parametrize("on_timeout,report,approved", [
    ("reject", quality_report(), False),
    ("approve_if_checks_passed", quality_report(), True),
    ("approve_if_checks_passed", quality_report(failed_rows=1), False),
])
def test_timeout_decision(on_timeout, report, approved):
    decision = timeout_decision(on_timeout, 30, report, ["a-pair"])
    assert decision.approved is approved
    assert decision.mode == "timeout" and decision.reviewer == "timeout" and decision.sample_ids == ["a-pair"]
    assert decision.notes.startswith("no decision within 30 s: ") and on_timeout in decision.notes
    assert decision.dropped_ids == []


def test_decision_record_keeps_wall_clock_out_of_the_data_and_tags_everything():
    decision = ReviewDecision(approved=True, mode="human", reviewer="alice", notes="ok", sample_ids=["a", "b"],
                              dropped_ids=["b"], decided_at="2026-01-02T03:04:05+00:00")
    assert "decided_at" not in decision.data_record()
    assert decision.data_record() == ReviewDecision(**{**decision.model_dump(), "decided_at": "x"}).data_record()
    tags = decision.mlflow_tags("flywheel.")
    assert tags == {
        "flywheel.review.approved": "true", "flywheel.review.mode": "human", "flywheel.review.reviewer": "alice",
        "flywheel.review.decided_at": "2026-01-02T03:04:05+00:00", "flywheel.review.notes": "ok",
        "flywheel.review.dropped_ids": '["b"]', "flywheel.review.sample_ids": '["a", "b"]',
    }
    many = ReviewDecision(approved=False, mode="human", reviewer="bob",
                          sample_ids=[f"row-{i:05d}" for i in range(2000)])
    assert len(many.mlflow_tags("flywheel.")["flywheel.review.sample_ids"]) <= 5000


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


def test_review_markdown_shows_each_rows_stratum():
    sample = review_sample(stratified_table(), 5, seed=0)
    page = review_markdown("round-0001", {}, sample, ["completion"])
    assert "**Instruction type:** json_format · **judge verdict:** fail" in page
    assert "**Instruction type:** all_lowercase · **judge verdict:** pass" in page


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
