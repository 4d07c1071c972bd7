import json

import pandas as pd
import pytest

from flywheel.evaluation import compare, echoed_answers, repetitive_answers, summarize
from flywheel.prompts import Prompt
from flywheel.textchecks import TextLimits
from flywheel.verifiers import Constraint


def judged(*rows) -> pd.DataFrame:
    """Rows of (prompt_id, checks dict, finished, n_tokens): one greedy answer per prompt, as evaluation sees it."""
    records = []
    for prompt_id, checks, finished, n_tokens in rows:
        records.append({
            "row_id": f"{prompt_id}-s0", "prompt_id": prompt_id, "prompt": f"text {prompt_id}", "sample_index": 0,
            "response": "r", "n_tokens": n_tokens, "finished": finished,
            "score": sum(checks.values()) / len(checks), "passed": all(checks.values()),
            "checks": json.dumps(checks),
        })
    return pd.DataFrame(records)


CANDIDATE = judged(
    ("p1", {"all_lowercase": True, "no_commas": True}, True, 10),
    ("p2", {"all_lowercase": False}, False, 20),
    ("p3", {"no_commas": True, "title": False}, True, 30),
    ("p4", {"title": True}, False, 40),
)
CHAMPION = judged(
    ("p1", {"all_lowercase": True, "no_commas": False}, True, 12),  # candidate wins (1.0 > 0.5)
    ("p2", {"all_lowercase": False}, True, 8),  # tie at 0
    ("p3", {"no_commas": True, "title": True}, True, 6),  # candidate loses (0.5 < 1.0)
    ("p4", {"title": False}, True, 4),  # candidate wins
)


def test_summarize_figures():
    scores = summarize(CANDIDATE)
    assert scores.prompts == 4
    assert scores.prompt_accuracy == pytest.approx(2 / 4)  # p1 and p4 pass everything
    assert scores.constraint_accuracy == pytest.approx(4 / 6)
    assert scores.per_type == {"all_lowercase": 0.5, "no_commas": 1.0, "title": 0.5}
    assert list(scores.per_type) == sorted(scores.per_type)
    assert scores.truncated_share == pytest.approx(0.5)
    assert scores.mean_tokens == pytest.approx(25.0)


def test_summarize_champion_figures():
    scores = summarize(CHAMPION)
    assert scores.prompt_accuracy == pytest.approx(1 / 4)
    assert scores.per_type == {"all_lowercase": 0.5, "no_commas": 0.5, "title": 0.5}
    assert scores.truncated_share == 0.0
    assert scores.mean_tokens == pytest.approx(7.5)


def test_summarize_empty_raises():
    with pytest.raises(ValueError, match="empty prompt set"):
        summarize(CANDIDATE.iloc[:0])


def test_compare_win_rate_counts_ties_half():
    evaluation = compare(CANDIDATE, CHAMPION)
    # wins p1, p4; tie p2; loss p3
    assert evaluation.win_rate == pytest.approx((2 + 0.5) / 4)
    assert evaluation.accuracy_gain == pytest.approx(0.5 - 0.25)
    assert evaluation.candidate == summarize(CANDIDATE)
    assert evaluation.champion == summarize(CHAMPION)
    reverse = compare(CHAMPION, CANDIDATE)
    assert reverse.win_rate == pytest.approx((1 + 0.5) / 4)
    assert reverse.accuracy_gain == pytest.approx(-0.25)


def test_compare_matches_prompts_by_id_not_position():
    shuffled = CHAMPION.iloc[::-1].reset_index(drop=True)
    assert compare(CANDIDATE, shuffled).win_rate == pytest.approx(2.5 / 4)


def test_compare_with_itself_is_all_ties():
    evaluation = compare(CANDIDATE, CANDIDATE)
    assert evaluation.win_rate == 0.5 and evaluation.accuracy_gain == 0.0


def test_metrics_are_flat_and_named():
    metrics = compare(CANDIDATE, CHAMPION).metrics()
    assert metrics["eval.win_rate"] == pytest.approx(0.625)
    assert metrics["eval.accuracy_gain"] == pytest.approx(0.25)
    assert metrics["eval.candidate.prompt_accuracy"] == pytest.approx(0.5)
    assert metrics["eval.champion.truncated_share"] == 0.0
    assert metrics["eval.candidate.type.no_commas"] == 1.0
    assert metrics["eval.champion.type.no_commas"] == 0.5
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize(
    "candidate,champion",
    [
        (CANDIDATE, CHAMPION.iloc[:3]),  # champion lacks a prompt
        (CANDIDATE.iloc[:3], CHAMPION),  # champion answered an extra prompt
        (CANDIDATE, CHAMPION.assign(prompt_id=["p1", "p2", "p3", "p9"])),  # same size, different prompts
    ],
    ids=["champion-missing", "champion-extra", "different-ids"],
)
def test_mismatched_prompt_sets_raise(candidate, champion):
    with pytest.raises(ValueError, match="same prompts"):
        compare(candidate, champion)


def _evaluation(cand_acc, champ_acc, cand_types, champ_types, cand_ppl=10.0, champ_ppl=10.0, counts=None):
    from flywheel.evaluation import Evaluation, ModelScores

    def scores(acc, types):
        return ModelScores(prompts=10, prompt_accuracy=acc, constraint_accuracy=acc, per_type=types,
                           per_type_count=counts or {}, truncated_share=0.0, mean_tokens=5.0)

    return Evaluation(candidate=scores(cand_acc, cand_types), champion=scores(champ_acc, champ_types),
                      win_rate=0.5, accuracy_gain=cand_acc - champ_acc, candidate_perplexity=cand_ppl,
                      champion_perplexity=champ_ppl)


def _with_base(evaluation, base_ppl):
    return evaluation.model_copy(update={"base_perplexity": base_ppl, "base_version": "1"})


POLICY = dict(min_gain=0.0, max_type_regression=0.1, max_perplexity_increase=0.05, require_human_approval=False)
BUDGET = {**POLICY, "max_perplexity_increase_vs_base": 0.15}


@pytest.mark.parametrize(("evaluation", "human", "policy", "promoted", "reason"), [
    (_evaluation(0.5, 0.4, {"a": 0.5}, {"a": 0.4}), False, POLICY, True, "accuracy gain +0.100 > min_gain"),
    (_evaluation(0.4, 0.4, {"a": 0.4}, {"a": 0.4}), False, POLICY, False, "accuracy gain +0.000 <= min_gain"),
    (_evaluation(0.6, 0.4, {"a": 0.9, "b": 0.2}, {"a": 0.4, "b": 0.5}), False, POLICY, False,
     "instruction types regressed beyond 0.1: b -0.300"),
    (_evaluation(0.6, 0.4, {"a": 0.9, "b": 0.45}, {"a": 0.4, "b": 0.5}), False, POLICY, True, "accuracy gain"),
    # b lost 0.5 on 2 instructions: below the support floor it is reported, not held against the candidate.
    (_evaluation(0.6, 0.4, {"a": 0.9, "b": 0.0}, {"a": 0.4, "b": 0.5}, counts={"a": 12, "b": 2}), False,
     {**POLICY, "min_type_support": 10}, True, "1 instruction types with fewer than 10 held-out instructions not "
                                               "checked for regression: b"),
    # The same drop on 12 instructions is checked.
    (_evaluation(0.6, 0.4, {"a": 0.9, "b": 0.0}, {"a": 0.4, "b": 0.5}, counts={"a": 12, "b": 12}), False,
     {**POLICY, "min_type_support": 10}, False, "instruction types regressed beyond 0.1: b -0.500"),
    # A record without counts (older rounds) checks every type whatever the floor.
    (_evaluation(0.6, 0.4, {"a": 0.9, "b": 0.0}, {"a": 0.4, "b": 0.5}), False,
     {**POLICY, "min_type_support": 10}, False, "instruction types regressed beyond 0.1: b -0.500"),
    (_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}, cand_ppl=11.0), False, POLICY, False,
     "probe perplexity +10.0% against the champion > 5.0%"),
    (_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}, cand_ppl=11.0), False,
     {**POLICY, "max_perplexity_increase": None}, True, "accuracy gain"),
    # Against the lineage's base: each round within its 5% can still add up past the budget...
    (_with_base(_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}, cand_ppl=10.4), 9.0), False, BUDGET, False,
     "probe perplexity +15.6% against the base (v1) > 15.0%"),
    (_with_base(_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}, cand_ppl=10.3), 9.0), False, BUDGET, True,
     "probe perplexity +14.4% against the base (v1) <= 15.0%"),
    # ...and with the budget alone, a round's step is free while the sum stays within it.
    (_with_base(_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}, cand_ppl=10.8), 11.0), False,
     {**POLICY, "max_perplexity_increase": None, "max_perplexity_increase_vs_base": 0.15}, True,
     "probe perplexity -1.8% against the base (v1) <= 15.0%"),
    # A lineage without a known base is refused when the budget is set, unchecked otherwise.
    (_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}), False, BUDGET, False,
     "probe perplexity of the base unknown: the perplexity guard cannot be checked"),
    (_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}), False, POLICY, True,
     "probe perplexity +0.0% against the champion <= 5.0%"),
    (_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}), False, {**POLICY, "require_human_approval": True}, False,
     "a human reviewer's approval is required"),
    (_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}), True, {**POLICY, "require_human_approval": True}, True,
     "accuracy gain"),
])
def test_promotion_verdict(evaluation, human, policy, promoted, reason):
    from flywheel.evaluation import promotion_verdict

    ok, reasons = promotion_verdict(evaluation, human, **policy)
    assert ok is promoted
    assert any(reason in r for r in reasons), reasons


def test_summary_counts_instructions_per_type():
    judged = pd.DataFrame({
        "checks": [json.dumps({"a": True, "b": False}), json.dumps({"a": False})],
        "passed": [False, False], "finished": [True, True], "n_tokens": [3, 4],
    })
    scores = summarize(judged)
    assert scores.per_type_count == {"a": 2, "b": 1}
    assert scores.per_type == {"a": 0.5, "b": 0.0}


def test_compare_counts_flipped_instructions_per_type():
    evaluation = compare(CANDIDATE, CHAMPION)
    # no_commas: gained on p1; title: lost on p3, gained on p4; all_lowercase: unchanged on p1 and p2.
    assert evaluation.per_type_flips == {"all_lowercase": [0, 0], "no_commas": [0, 1], "title": [1, 1]}


@pytest.mark.parametrize(("lost", "gained", "p"), [
    (0, 0, 1.0), (1, 0, 0.5), (2, 0, 0.25), (4, 0, 0.0625), (5, 0, 0.03125), (3, 3, 0.65625), (0, 4, 1.0),
    (6, 1, 8 / 128),
])
def test_sign_test_p(lost, gained, p):
    from flywheel.evaluation import sign_test_p

    assert sign_test_p(lost, gained) == pytest.approx(p)


def _with_flips(evaluation, flips):
    return evaluation.model_copy(update={"per_type_flips": flips})


@pytest.mark.parametrize(("flips", "promoted", "reason"), [
    # b fell 0.5: on one flipped instruction out of two, that is noise at alpha 0.05...
    ({"a": [0, 5], "b": [1, 0]}, True, "instruction types down beyond 0.1 but not significantly (sign test, "
                                       "p >= 0.05): b -0.500 (lost 1, gained 0, p=0.500)"),
    # ...on five lost and none gained it is a regression.
    ({"a": [0, 5], "b": [5, 0]}, False, "instruction types regressed beyond 0.1, significant at 0.05 (sign test): "
                                        "b -0.500 (lost 5, gained 0, p=0.031)"),
    # A record without flip counts is judged by the threshold alone.
    ({}, False, "instruction types regressed beyond 0.1, significant at 0.05 (sign test): b -0.500"),
])
def test_promotion_verdict_with_a_significance_test(flips, promoted, reason):
    from flywheel.evaluation import promotion_verdict

    evaluation = _with_flips(_evaluation(0.6, 0.4, {"a": 0.9, "b": 0.0}, {"a": 0.4, "b": 0.5}), flips)
    ok, reasons = promotion_verdict(evaluation, False, **POLICY, type_regression_alpha=0.05)
    assert ok is promoted
    assert any(reason in r for r in reasons), reasons
    # A drop within the threshold is never tested.
    small = _with_flips(_evaluation(0.6, 0.4, {"a": 0.9, "b": 0.45}, {"a": 0.4, "b": 0.5}), flips)
    assert promotion_verdict(small, False, **POLICY, type_regression_alpha=0.05)[0]


@pytest.mark.parametrize(("gain_metric", "promoted", "reason"), [
    # Prompt level rose 0.1 while instruction level fell 0.05: the metric chosen decides.
    ("prompt", True, "prompt accuracy gain +0.100 > min_gain 0.0"),
    ("instruction", False, "instruction accuracy gain -0.050 <= min_gain 0.0"),
])
def test_promotion_verdict_gain_metric(gain_metric, promoted, reason):
    from flywheel.evaluation import promotion_verdict

    evaluation = _evaluation(0.5, 0.4, {"a": 0.5}, {"a": 0.5})
    evaluation = evaluation.model_copy(update={
        "candidate": evaluation.candidate.model_copy(update={"constraint_accuracy": 0.55}),
        "champion": evaluation.champion.model_copy(update={"constraint_accuracy": 0.60}),
    })
    ok, reasons = promotion_verdict(evaluation, False, **POLICY, gain_metric=gain_metric)
    assert ok is promoted
    assert reason in reasons


def test_promotion_verdict_refuses_an_unknown_gain_metric():
    from flywheel.evaluation import promotion_verdict

    with pytest.raises(ValueError, match="unknown gain_metric"):
        promotion_verdict(_evaluation(0.5, 0.4, {}, {}), False, **POLICY, gain_metric="loose")


def test_paired_gain_with_one_item_per_prompt_is_the_paired_difference_of_proportions():
    from flywheel.evaluation import paired_gain

    # 10 prompts: 4 gained, 1 lost, 5 unchanged.
    estimate = paired_gain([(1, 0, 1)] * 4 + [(1, 1, 0)] + [(1, 0, 0)] * 5)
    assert (estimate.items, estimate.lost, estimate.gained, estimate.up, estimate.down) == (10, 1, 4, 4, 1)
    assert estimate.gain == pytest.approx(0.3)
    # Differences d in {+1 x4, -1 x1, 0 x5}: sum (d - 0.3)^2 = 4*0.49 + 1.69 + 5*0.09 = 4.1; var = 10/9 * 4.1.
    half = 1.959964 * (10 / 9 * 4.1) ** 0.5 / 10
    assert (estimate.ci_low, estimate.ci_high) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    assert estimate.p_value == pytest.approx(6 / 32)  # at least 4 ups of 5 changed prompts: (5 + 1) / 2^5


def test_paired_gain_counts_a_prompts_instructions_as_one_unit():
    from flywheel.evaluation import paired_gain

    # The same 6-point gain on 100 instructions: spread over 6 prompts, or all 6 in one prompt's answer.
    spread = paired_gain([(2, 0, 1)] * 6 + [(2, 0, 0)] * 44)
    lumped = paired_gain([(2, 0, 2), (2, 0, 2), (2, 0, 2)] + [(2, 0, 0)] * 47)
    assert spread.gain == lumped.gain == pytest.approx(0.06)
    # Instructions that flip together in one answer are less evidence: a wider interval...
    assert lumped.ci_high - lumped.ci_low > spread.ci_high - spread.ci_low
    # ...and the sign test counts prompts, not instructions.
    assert (spread.up, lumped.up) == (6, 3)
    assert spread.p_value == pytest.approx(1 / 64) and lumped.p_value == pytest.approx(1 / 8)


def test_paired_gain_bounds():
    from flywheel.evaluation import paired_gain

    unchanged = paired_gain([(1, 0, 0)] * 5)
    assert (unchanged.gain, unchanged.ci_low, unchanged.ci_high, unchanged.p_value) == (0.0, 0.0, 0.0, 1.0)
    single = paired_gain([(3, 0, 3)])
    assert (single.gain, single.ci_low, single.ci_high) == (1.0, -1.0, 1.0)  # one prompt: nothing known
    everything = paired_gain([(1, 0, 1)] * 8)
    assert everything.ci_high == 1.0 and everything.p_value == pytest.approx(1 / 256)
    with pytest.raises(ValueError, match="empty"):
        paired_gain([])


def test_compare_estimates_both_gains():
    evaluation = compare(CANDIDATE, CHAMPION)
    # Prompt level: p1 and p4 pass only for the candidate, p3 only for the champion, p2 for neither.
    assert (evaluation.prompt_gain.gained, evaluation.prompt_gain.lost) == (2, 1)
    assert evaluation.prompt_gain.gain == pytest.approx(evaluation.accuracy_gain)
    # Instruction level: gained no_commas on p1 and title on p4, lost title on p3, over 6 instructions.
    gain = evaluation.instruction_gain
    assert (gain.items, gain.gained, gain.lost, gain.up, gain.down) == (6, 2, 1, 2, 1)
    assert gain.gain == pytest.approx(evaluation.candidate.constraint_accuracy
                                      - evaluation.champion.constraint_accuracy)
    metrics = evaluation.metrics()
    assert metrics["eval.instruction_gain.gain"] == pytest.approx(1 / 6)
    assert metrics["eval.prompt_gain.p_value"] == pytest.approx(0.5)  # 2 up of 3 changed: (3 + 1) / 8
    assert metrics["eval.prompt_gain.ci_low"] < 0.25 < metrics["eval.prompt_gain.ci_high"]


def _with_gain(evaluation, p_value, metric="prompt"):
    from flywheel.evaluation import PairedGain

    estimate = PairedGain(items=10, lost=0, gained=1, gain=0.1, ci_low=-0.05, ci_high=0.25, up=1, down=0,
                          p_value=p_value)
    return evaluation.model_copy(update={f"{metric}_gain": estimate})


@pytest.mark.parametrize(("p_value", "gain_alpha", "promoted", "reason"), [
    (0.5, None, True, "prompt accuracy gain +0.100 > min_gain 0.0 (95% CI -0.050 to +0.250; prompts up 1, down 0, "
                      "p=0.500)"),
    (0.5, 0.05, False, "gain not significant: p=0.500 >= gain_alpha 0.05"),
    (0.01, 0.05, True, "gain significant: p=0.010 < gain_alpha 0.05"),
    (None, 0.05, False, "gain significance unknown"),
])
def test_promotion_verdict_gain_alpha(p_value, gain_alpha, promoted, reason):
    from flywheel.evaluation import promotion_verdict

    evaluation = _evaluation(0.5, 0.4, {"a": 0.5}, {"a": 0.4})
    if p_value is not None:
        evaluation = _with_gain(evaluation, p_value)
    ok, reasons = promotion_verdict(evaluation, False, **POLICY, gain_alpha=gain_alpha)
    assert ok is promoted
    assert any(r.startswith(reason) for r in reasons), reasons


def test_promotion_verdict_gain_alpha_reads_the_chosen_metric():
    from flywheel.evaluation import promotion_verdict

    # Significant at prompt level only: the instruction metric has no estimate, so it is refused.
    evaluation = _with_gain(_evaluation(0.5, 0.4, {"a": 0.5}, {"a": 0.4}), 0.01, "prompt")
    assert promotion_verdict(evaluation, False, **POLICY, gain_alpha=0.05, gain_metric="prompt")[0]
    assert not promotion_verdict(evaluation, False, **POLICY, gain_alpha=0.05, gain_metric="instruction")[0]


def test_metrics_carry_the_drift_against_the_base_only_when_measured():
    measured = _with_base(_evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}, cand_ppl=11.0, champ_ppl=10.0), 8.0)
    metrics = measured.metrics()
    assert metrics["eval.base.probe_perplexity"] == 8.0
    assert metrics["eval.probe_perplexity_increase_vs_base"] == pytest.approx(0.375)
    assert metrics["eval.probe_perplexity_increase"] == pytest.approx(0.1)
    unmeasured = _evaluation(0.6, 0.4, {"a": 0.6}, {"a": 0.4}).metrics()
    assert not any("vs_base" in k or k.startswith("eval.base.") for k in unmeasured)


def test_echoed_answers_counts_answers_that_copy_their_instructions_and_metrics_show_them():
    prompts = [Prompt(id="p1", prompt="Tea. Use exactly 2 bullets.",
                      constraints=[Constraint(type="bullet_count_exact", args={"num_bullets": 2})]),
               Prompt(id="p2", prompt="Tea. End with again.", constraints=[Constraint(type="last_word",
                                                                                        args={"word": "again"})]),
               Prompt.model_construct(id="p3", prompt="Tell me about tea.", constraints=[], topic="")]
    answers = CANDIDATE.iloc[:3].assign(response=["* This is a point\n* Tea", "Brew it, then brew it again",
                                                  "Tea is a drink."])
    assert echoed_answers(answers, prompts) == 1
    copied = answers.assign(response=["* Green\n* Black", 'The last word of your response must be "again".',
                                      "Tea is a drink."])
    assert echoed_answers(copied, prompts) == 1
    assert echoed_answers(pd.concat([answers, copied]), prompts) == 2
    with pytest.raises(ValueError, match="not given"):
        echoed_answers(answers, prompts[:1])
    metrics = compare(CANDIDATE, CHAMPION).model_copy(update={"candidate_echoes": 3, "champion_echoes": 1}).metrics()
    assert (metrics["eval.candidate.echoed_answers"], metrics["eval.champion.echoed_answers"]) == (3.0, 1.0)
    assert "eval.candidate.echoed_answers" not in compare(CANDIDATE, CHAMPION).metrics()


def test_repetitive_answers_counts_answers_that_loop_and_metrics_show_them():
    loop = "THE BREAD IS WARM. " * 5  # "the bread is warm" five times
    answers = CANDIDATE.iloc[:3].assign(response=[loop, "THE BREAD IS WARM. " * 4, "Bread, warm and fresh."])
    assert repetitive_answers(answers, TextLimits(repetition_ngram=4, repetition_max_repeats=4)) == 1
    assert repetitive_answers(answers, TextLimits(repetition_ngram=4, repetition_max_repeats=3)) == 2
    # no 5-gram spans the loop 5 times
    assert repetitive_answers(answers, TextLimits(repetition_ngram=5, repetition_max_repeats=4)) == 0
    metrics = compare(CANDIDATE, CHAMPION).model_copy(update={"candidate_repetitive": 4,
                                                              "champion_repetitive": 2}).metrics()
    assert (metrics["eval.candidate.repetitive_answers"], metrics["eval.champion.repetitive_answers"]) == (4.0, 2.0)
    assert "eval.candidate.repetitive_answers" not in compare(CANDIDATE, CHAMPION).metrics()
