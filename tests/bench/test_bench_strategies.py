"""bench/strategies.py's per-type table: the served model is the last promoted candidate, the base round 1's champion."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import strategies  # noqa: E402


def _record(workspace: Path, number: int, candidate: dict, champion: dict, promoted: bool) -> None:
    rounds = workspace / ".flywheel" / "rounds"
    rounds.mkdir(parents=True, exist_ok=True)
    counts = {"all_lowercase": 10, "no_commas": 20}
    evaluation = {"candidate": {"per_type": candidate, "per_type_count": counts},
                  "champion": {"per_type": champion, "per_type_count": counts}}
    (rounds / f"round-{number:04d}.json").write_text(json.dumps({"evaluation": evaluation,
                                                                  "promotion": {"promoted": promoted}}))


def test_served_per_type_compares_the_last_promoted_candidate_with_the_base(tmp_path):
    base = {"all_lowercase": 0.0, "no_commas": 0.5}
    first = {"all_lowercase": 0.3, "no_commas": 0.4}
    _record(tmp_path, 1, first, base, promoted=True)
    _record(tmp_path, 2, {"all_lowercase": 0.9, "no_commas": 0.9}, first, promoted=False)  # refused: not served
    rows = strategies.served_per_type("repair", tmp_path, 2)
    assert [row["type"] for row in rows] == ["all_lowercase", "no_commas"]  # gains first
    lower, commas = rows
    assert (lower["base"], lower["served"], lower["instructions"]) == (0.0, 0.3, 10)
    assert lower["met_difference"] == 3.0
    assert abs(commas["met_difference"] - (-2.0)) < 1e-9
    # Nothing promoted: the base is served.
    _record(tmp_path, 1, first, base, promoted=False)
    assert all(row["met_difference"] == 0.0 for row in strategies.served_per_type("repair", tmp_path, 2))
