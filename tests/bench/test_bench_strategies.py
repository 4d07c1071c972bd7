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


def _full_record(workspace: Path, promoted: bool, extra: dict) -> None:
    scores = {"candidate": {"prompt_accuracy": 0.4, "constraint_accuracy": 0.6, "loose_constraint_accuracy": 0.65},
              "champion": {"prompt_accuracy": 0.3, "constraint_accuracy": 0.5}}
    record = {"evaluation": {**scores, "win_rate": 0.55, "candidate_perplexity": 11.0, "champion_perplexity": 10.0,
                             "base_perplexity": 10.0, **extra},
              "promotion": {"promoted": promoted}, "judged": {"pass_rate": 0.3, "agreement": None},
              "quality": {"clean": {"pairs": 0, "sft": 57}, "quarantined": 3},
              "trained": {"steps": 45, "seconds": 120.0}, "generations": {"seconds": 200.0}}
    rounds = workspace / ".flywheel" / "rounds"
    rounds.mkdir(parents=True, exist_ok=True)
    (rounds / "round-0001.json").write_text(json.dumps(record))


def test_round_row_serves_the_champion_unless_promoted_and_reads_old_records(tmp_path):
    _full_record(tmp_path, True, {"candidate_echoes": 19, "candidate_repetitive": 14})
    row = strategies.round_row("repair", 1, tmp_path, 400.0)
    assert (row["instr_acc"], row["champion_instr_acc"], row["served_instr_acc"]) == (0.6, 0.5, 0.6)
    assert (row["copies"], row["loops"], row["sft"], row["quarantined"], row["train_steps"]) == (19, 14, 57, 3, 45)
    assert abs(row["perplexity_vs_champion"] - 0.1) < 1e-9 and row["loose_prompt_acc"] is None
    # Refused: the champion stays served. A record made before the copy and loop counts reads None for them.
    _full_record(tmp_path, False, {})
    row = strategies.round_row("repair", 1, tmp_path, 400.0)
    assert (row["served_instr_acc"], row["promoted"], row["copies"], row["loops"]) == (0.5, False, None, None)
