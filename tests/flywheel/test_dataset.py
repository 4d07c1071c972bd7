import hashlib
import json

import pandas as pd
import pytest

from flywheel.config import FeedbackConfig
from flywheel.dataset import (
    PAIR_COLUMNS,
    SFT_COLUMNS,
    build_pairs,
    build_sft,
    file_sha256,
    read_table,
    write_json,
    write_parquet,
)
from flywheel.feedback import SAMPLE_COLUMNS


def samples(*rows) -> pd.DataFrame:
    """Rows of (prompt_id, sample_index, response, score); passed means score 1."""
    records = []
    for prompt_id, index, response, score in rows:
        records.append({
            "row_id": f"{prompt_id}-s{index}", "prompt_id": prompt_id, "prompt": f"prompt text of {prompt_id}",
            "sample_index": index, "response": response, "n_tokens": len(response.split()), "finished": True,
            "score": float(score), "passed": score == 1.0, "checks": "{}",
        })
    return pd.DataFrame(records, columns=SAMPLE_COLUMNS)


LOOSE = FeedbackConfig(chosen_must_pass=False, min_score_gap=0.0)
STRICT = FeedbackConfig(chosen_must_pass=True, min_score_gap=0.0)


def test_pairs_pick_best_as_chosen_and_worst_as_rejected():
    frame = samples(
        ("b", 0, "middle", 0.5), ("b", 1, "best", 1.0), ("b", 2, "worst", 0.0), ("b", 3, "also middle", 0.5),
        ("a", 0, "good", 1.0), ("a", 1, "bad", 0.0),
    )
    pairs = build_pairs(frame, LOOSE)
    assert list(pairs.columns) == PAIR_COLUMNS
    assert pairs.to_dict(orient="records") == [
        {"row_id": "a-pair", "prompt_id": "a", "prompt": "prompt text of a", "chosen": "good", "rejected": "bad",
         "chosen_score": 1.0, "rejected_score": 0.0},
        {"row_id": "b-pair", "prompt_id": "b", "prompt": "prompt text of b", "chosen": "best", "rejected": "worst",
         "chosen_score": 1.0, "rejected_score": 0.0},
    ]


def test_ties_break_by_sample_index():
    frame = samples(("a", 2, "late best", 1.0), ("a", 0, "early best", 1.0), ("a", 1, "low one", 0.0),
                    ("a", 3, "low two", 0.0))
    pair = build_pairs(frame, LOOSE).iloc[0]
    assert pair["chosen"] == "early best"
    assert pair["rejected"] == "low two"  # the last in (score desc, sample asc) order


def test_chosen_must_pass():
    frame = samples(("a", 0, "partial", 0.5), ("a", 1, "nothing", 0.0), ("b", 0, "full", 1.0), ("b", 1, "half", 0.5))
    assert list(build_pairs(frame, LOOSE)["prompt_id"]) == ["a", "b"]
    strict = build_pairs(frame, STRICT)
    assert list(strict["prompt_id"]) == ["b"]
    assert strict.iloc[0]["chosen"] == "full" and strict.iloc[0]["rejected"] == "half"


@pytest.mark.parametrize("gap,expected", [(0.0, ["big", "small"]), (0.3, ["big"]), (0.5, []), (0.9, [])])
def test_min_score_gap_is_exclusive(gap, expected):
    frame = samples(
        ("big", 0, "x y", 1.0), ("big", 1, "y z", 0.5),  # gap 0.5
        ("small", 0, "p q", 0.5), ("small", 1, "q r", 0.25),  # gap 0.25
    )
    config = FeedbackConfig(chosen_must_pass=False, min_score_gap=gap)
    assert list(build_pairs(frame, config)["prompt_id"]) == expected


def test_no_pair_from_equal_scores_or_identical_texts():
    frame = samples(
        ("all-pass", 0, "one", 1.0), ("all-pass", 1, "two", 1.0),
        ("all-fail", 0, "one", 0.0), ("all-fail", 1, "two", 0.0),
        ("same-text", 0, "same answer", 1.0), ("same-text", 1, "  same answer\n", 0.0),
        ("single", 0, "alone", 1.0),
        ("ok", 0, "right", 1.0), ("ok", 1, "wrong", 0.0),
    )
    assert list(build_pairs(frame, LOOSE)["prompt_id"]) == ["ok"]


def test_no_samples_no_pairs():
    pairs = build_pairs(samples(), LOOSE)
    assert pairs.empty and list(pairs.columns) == PAIR_COLUMNS


def test_sft_keeps_distinct_samples_at_or_above_the_bar():
    frame = samples(
        ("a", 0, "good answer", 1.0), ("a", 1, "good answer  ", 1.0), ("a", 2, "other good", 1.0),
        ("a", 3, "half", 0.5), ("b", 0, "good answer", 1.0), ("b", 1, "nope", 0.0),
    )
    frame.loc[frame["row_id"] == "a-s2", "finished"] = False  # cut off by the token limit
    sft = build_sft(frame, FeedbackConfig(sft_min_score=1.0))
    assert list(sft.columns) == [*SFT_COLUMNS, "ended"]
    assert sft.to_dict(orient="records") == [
        {"row_id": "a-sft0", "prompt_id": "a", "prompt": "prompt text of a", "completion": "good answer", "score": 1.0,
         "ended": True},
        {"row_id": "a-sft2", "prompt_id": "a", "prompt": "prompt text of a", "completion": "other good", "score": 1.0,
         "ended": False},
        # The same text for another prompt is a different row.
        {"row_id": "b-sft0", "prompt_id": "b", "prompt": "prompt text of b", "completion": "good answer", "score": 1.0,
         "ended": True},
    ]
    lower = build_sft(frame, FeedbackConfig(sft_min_score=0.5))
    assert list(lower["row_id"]) == ["a-sft0", "a-sft2", "a-sft3", "b-sft0"]
    everything = build_sft(frame, FeedbackConfig(sft_min_score=0.0))
    assert list(everything["row_id"]) == ["a-sft0", "a-sft2", "a-sft3", "b-sft0", "b-sft1"]
    assert sft["row_id"].is_unique and everything["row_id"].is_unique


def test_sft_max_per_prompt_keeps_the_best_of_each_prompt():
    frame = samples(
        ("a", 0, "half", 0.5), ("a", 1, "cut off", 1.0), ("a", 2, "finished", 1.0), ("a", 3, "also finished", 1.0),
        ("b", 0, "only one", 1.0), ("c", 0, "fails", 0.0),
    )
    frame.loc[frame["row_id"] == "a-s1", "finished"] = False
    one = build_sft(frame, FeedbackConfig(sft_min_score=0.5, sft_max_per_prompt=1))
    # The highest score first, a finished answer before a cut-off one, then the earlier sample.
    assert list(one["row_id"]) == ["a-sft2", "b-sft0"]
    two = build_sft(frame, FeedbackConfig(sft_min_score=0.5, sft_max_per_prompt=2))
    assert list(two["row_id"]) == ["a-sft2", "a-sft3", "b-sft0"]
    three = build_sft(frame, FeedbackConfig(sft_min_score=0.5, sft_max_per_prompt=3))
    assert list(three["row_id"]) == ["a-sft1", "a-sft2", "a-sft3", "b-sft0"]  # kept rows stay in sample order
    unbounded = build_sft(frame, FeedbackConfig(sft_min_score=0.5))
    assert list(unbounded["row_id"]) == ["a-sft0", "a-sft1", "a-sft2", "a-sft3", "b-sft0"]
    with pytest.raises(ValueError):
        FeedbackConfig(sft_max_per_prompt=0)


def test_sft_with_nothing_accepted():
    sft = build_sft(samples(("a", 0, "x", 0.0)), FeedbackConfig(sft_min_score=1.0))
    assert sft.empty and list(sft.columns) == [*SFT_COLUMNS, "ended"]


def test_write_parquet_is_atomic_and_returns_the_sha(tmp_path):
    frame = samples(("a", 0, "one", 1.0), ("a", 1, "two", 0.0))
    target = tmp_path / "round" / "samples.parquet"
    digest = write_parquet(frame, target)
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest() == file_sha256(target)
    assert [p.name for p in target.parent.iterdir()] == ["samples.parquet"]
    pd.testing.assert_frame_equal(read_table(target), frame)
    # Overwriting replaces the content and still leaves nothing behind.
    smaller = frame.iloc[:1]
    assert write_parquet(smaller, target) != digest
    assert len(read_table(target)) == 1
    assert [p.name for p in target.parent.iterdir()] == ["samples.parquet"]


def test_write_parquet_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "pairs.parquet"
    digest = write_parquet(pd.DataFrame({"a": [1, 2]}), target)
    unwritable = pd.DataFrame({"a": [1, "mixed"]})  # pyarrow refuses a column of int and str
    with pytest.raises(Exception):
        write_parquet(unwritable, target)
    assert file_sha256(target) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]


def test_write_json_and_read_table_errors(tmp_path):
    path = tmp_path / "meta.json"
    digest = write_json({"b": 1, "a": [1, 2]}, path)
    assert digest == file_sha256(path)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(ValueError, match="broken.parquet: unreadable Parquet table"):
        read_table(broken)
