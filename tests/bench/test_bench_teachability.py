"""bench/teachability.py's figures for one model, from a judged held-out table as greedy_eval returns it."""

import json
import sys
from pathlib import Path

import pandas as pd

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import teachability  # noqa: E402

from flywheel.textchecks import TextLimits  # noqa: E402

LOOP = "THE PEAK OF " * 8


def _judged(rows: list[tuple[dict, str]]) -> pd.DataFrame:
    return pd.DataFrame({"checks": [json.dumps(checks) for checks, _ in rows],
                         "passed": [all(checks.values()) for checks, _ in rows],
                         "finished": [True] * len(rows), "n_tokens": [10] * len(rows),
                         "response": [response for _, response in rows]})


def test_held_out_scores_count_the_type_apart_from_every_prompt():
    judged = _judged([
        ({"no_commas": True}, "A plain answer without commas."),
        ({"all_uppercase": False, "no_commas": False}, "Lower case, with a comma."),
        ({"all_uppercase": True}, LOOP),
        ({"all_uppercase": True, "no_commas": True}, "SHOUTING A REAL ANSWER."),
        ({"no_commas": False}, "one two three " * 8),
    ])
    scores = teachability.held_out_scores(judged, "all_uppercase", TextLimits())
    assert (scores["met"], scores["held_out"]) == (2, 3)
    assert scores["accuracy"] == 4 / 7  # every instruction of every prompt, not only the type's
    assert (scores["repetitive"], scores["repetitive_all"], scores["answers"]) == (1, 2, 5)
    assert scores["example"] == "Lower case, with a comma."


def test_held_out_scores_without_the_type():
    judged = _judged([({"no_commas": True}, "Fine.")])
    scores = teachability.held_out_scores(judged, "all_uppercase", TextLimits())
    assert (scores["met"], scores["held_out"], scores["repetitive"], scores["example"]) == (0, 0, 0, "")
