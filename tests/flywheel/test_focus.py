from collections import Counter

import pytest

from flywheel.focus import focused_round_prompts, prompt_weight, teachable_failure
from flywheel.prompts import Prompt
from flywheel.verifiers import Constraint


def _prompt(i: int, *types: str) -> Prompt:
    return Prompt(id=f"p{i}", prompt=f"prompt {i}", constraints=[Constraint(type=t) for t in types])


def test_teachable_failure_counts_failures_only_on_prompts_the_round_taught():
    checks = [
        ("a", {"all_uppercase": False, "no_commas": True}),
        ("a", {"all_uppercase": False, "no_commas": False}),
        ("b", {"all_uppercase": False}),  # failed, but no training row came of it
        ("c", {"no_commas": True}),
    ]
    scores = teachable_failure(checks, taught={"a", "c"})
    assert scores == {"all_uppercase": pytest.approx(0.5), "no_commas": pytest.approx(0.25)}
    assert teachable_failure(checks, taught=set()) == {"all_uppercase": 0.0, "no_commas": 0.0}
    assert teachable_failure([], taught={"a"}) == {}


def test_prompt_weight_is_one_plus_focus_times_the_mean_score_of_its_types():
    scores = {"all_uppercase": 1.0, "no_commas": 0.0}
    assert prompt_weight(_prompt(0, "all_uppercase", "no_commas"), scores, 4.0) == pytest.approx(3.0)
    assert prompt_weight(_prompt(0, "no_commas"), scores, 4.0) == pytest.approx(1.0)
    assert prompt_weight(_prompt(0, "title"), scores, 4.0) == pytest.approx(3.0)  # unseen: the scores' mean
    assert prompt_weight(_prompt(0, "title"), {}, 4.0) == pytest.approx(1.0)
    assert prompt_weight(_prompt(0, "all_uppercase"), scores, 0.0) == 1.0
    with pytest.raises(ValueError, match="focus must be >= 0"):
        prompt_weight(_prompt(0, "title"), scores, -1.0)


def test_focused_round_prompts_lean_toward_high_scores_and_skip_answered_prompts():
    train = [_prompt(i, "all_uppercase" if i % 4 == 0 else "no_commas") for i in range(400)]
    scores = {"all_uppercase": 1.0, "no_commas": 0.0}
    answered = {f"p{i}" for i in range(0, 400, 8)}  # half of the uppercase prompts
    drawn = focused_round_prompts(train, 60, 2, scores, 9.0, answered)
    assert len({p.id for p in drawn}) == 60 and not {p.id for p in drawn} & answered
    uppercase = Counter(p.constraints[0].type for p in drawn)["all_uppercase"]
    # 50 uppercase prompts of weight 10 against 300 of weight 1: far above their eighth of the fresh pool.
    assert uppercase >= 30
    unfocused = focused_round_prompts(train, 60, 2, scores, 0.0, answered)
    assert Counter(p.constraints[0].type for p in unfocused)["all_uppercase"] < 20
    # Seeded and independent of the input order; another round or seed draws others.
    assert focused_round_prompts(list(reversed(train)), 60, 2, scores, 9.0, answered) == drawn
    assert focused_round_prompts(train, 60, 3, scores, 9.0, answered) != drawn
    assert focused_round_prompts(train, 60, 2, scores, 9.0, answered, seed=1) != drawn


def test_focused_round_prompts_start_over_once_too_few_are_fresh():
    train = [_prompt(i, "no_commas") for i in range(10)]
    drawn = focused_round_prompts(train, 4, 5, {}, 1.0, answered={f"p{i}" for i in range(8)})
    assert len(drawn) == 4 and len({p.id for p in drawn}) == 4
    assert {p.id for p in focused_round_prompts(train, 20, 1, {}, 1.0, answered=set())} == {p.id for p in train}
    with pytest.raises(ValueError, match="k must be >= 1"):
        focused_round_prompts(train, 0, 1, {}, 1.0, set())
    with pytest.raises(ValueError, match="no training prompts"):
        focused_round_prompts([], 1, 1, {}, 1.0, set())
