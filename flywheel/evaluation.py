"""Held-out evaluation with the same verifiers that judge training data, and the candidate-vs-champion comparison."""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from flywheel.open_ended import OpenEndedResult
from flywheel.prompts import Prompt
from flywheel.textchecks import TextLimits, is_repetitive
from flywheel.verifiers import echoed_instruction

# Consecutive words of an instruction an evaluated answer must share to count as a copy, unless the recipe's
# feedback.echo_ngram says otherwise: long enough that no natural answer shares it by chance.
ECHO_NGRAM = 6


class ModelScores(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prompts: int
    prompt_accuracy: float  # share of prompts whose response satisfies every constraint
    constraint_accuracy: float  # share of all constraints satisfied
    per_type: dict[str, float]  # instruction type -> share satisfied
    # instruction type -> instructions of that type scored (empty in records made before it was kept)
    per_type_count: dict[str, int] = {}
    truncated_share: float  # responses cut at the token limit
    mean_tokens: float
    # The same answers checked loosely (markdown stripped, first/last line dropped): None where not computed.
    loose_prompt_accuracy: float | None = None
    loose_constraint_accuracy: float | None = None


class PairedGain(BaseModel):
    """The candidate's held-out accuracy minus the champion's on the same items, with its uncertainty.

    Items are prompts (prompt level) or instructions (instruction level). The interval is a normal 95% interval
    whose variance treats each prompt as one unit (a cluster of its instructions: they share one answer, so they are
    not independent draws). ``p_value`` is the one-sided exact sign test over prompts: how likely at least ``up``
    of the ``up + down`` prompts that changed would have changed for the better if neither model were better."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    items: int
    lost: int  # items the champion met and the candidate did not
    gained: int  # and the reverse
    gain: float
    ci_low: float
    ci_high: float
    up: int  # prompts with more items met by the candidate than by the champion
    down: int  # prompts with fewer
    p_value: float


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    candidate: ModelScores
    champion: ModelScores
    win_rate: float  # candidate beats champion per prompt on verifier score; ties count half
    accuracy_gain: float
    candidate_perplexity: float | None = None  # general-text probe (flywheel.probe)
    champion_perplexity: float | None = None
    # The probe on the base model the champion descends from (its parent chain's first version), and that version.
    base_perplexity: float | None = None
    base_version: str | None = None
    open_ended: OpenEndedResult | None = None  # LLM-judged comparison on open-ended prompts (evaluation.open_ended)
    # instruction type -> [lost, gained]: instructions the champion satisfied and the candidate not, and the reverse
    # (same prompts; empty in records made before it was kept)
    per_type_flips: dict[str, list[int]] = {}
    # The paired gains with their intervals (None in records made before they were kept).
    prompt_gain: PairedGain | None = None
    instruction_gain: PairedGain | None = None
    # Held-out answers that copy their instructions' wording (``echoed_answers``): the checks count them as they
    # are, so a gain made of copies shows here (None in records made before it was kept).
    candidate_echoes: int | None = None
    champion_echoes: int | None = None
    # Held-out answers that are degenerate repetitions (``repetitive_answers``): a loop can still meet a format
    # instruction (all capitals, a title), so a gain made of loops shows here (None in records made before it was kept).
    candidate_repetitive: int | None = None
    champion_repetitive: int | None = None

    def gain_estimate(self, metric: str) -> PairedGain | None:
        if metric not in ("prompt", "instruction"):
            raise ValueError(f"unknown gain metric {metric!r} (prompt or instruction)")
        return self.prompt_gain if metric == "prompt" else self.instruction_gain

    @property
    def perplexity_increase(self) -> float | None:
        if self.candidate_perplexity is None or self.champion_perplexity is None:
            return None
        return self.candidate_perplexity / self.champion_perplexity - 1

    @property
    def perplexity_increase_vs_base(self) -> float | None:
        if self.candidate_perplexity is None or self.base_perplexity is None:
            return None
        return self.candidate_perplexity / self.base_perplexity - 1

    def metrics(self) -> dict[str, float]:
        flat = {
            "eval.win_rate": self.win_rate,
            "eval.accuracy_gain": self.accuracy_gain,
        }
        if self.perplexity_increase is not None:
            flat["eval.candidate.probe_perplexity"] = self.candidate_perplexity
            flat["eval.champion.probe_perplexity"] = self.champion_perplexity
            flat["eval.probe_perplexity_increase"] = self.perplexity_increase
        if self.perplexity_increase_vs_base is not None:
            flat["eval.base.probe_perplexity"] = self.base_perplexity
            flat["eval.probe_perplexity_increase_vs_base"] = self.perplexity_increase_vs_base
        if self.open_ended is not None:
            flat["eval.open_ended.win_rate"] = self.open_ended.win_rate
            flat["eval.open_ended.wins"] = float(self.open_ended.wins)
            flat["eval.open_ended.losses"] = float(self.open_ended.losses)
            flat["eval.open_ended.ties"] = float(self.open_ended.ties)
        for metric in ("prompt", "instruction"):
            estimate = self.gain_estimate(metric)
            if estimate is not None:
                for field in ("gain", "ci_low", "ci_high", "p_value"):
                    flat[f"eval.{metric}_gain.{field}"] = float(getattr(estimate, field))
        if self.candidate_echoes is not None and self.champion_echoes is not None:
            flat["eval.candidate.echoed_answers"] = float(self.candidate_echoes)
            flat["eval.champion.echoed_answers"] = float(self.champion_echoes)
        if self.candidate_repetitive is not None and self.champion_repetitive is not None:
            flat["eval.candidate.repetitive_answers"] = float(self.candidate_repetitive)
            flat["eval.champion.repetitive_answers"] = float(self.champion_repetitive)
        for label, scores in (("candidate", self.candidate), ("champion", self.champion)):
            flat[f"eval.{label}.prompt_accuracy"] = scores.prompt_accuracy
            flat[f"eval.{label}.constraint_accuracy"] = scores.constraint_accuracy
            flat[f"eval.{label}.truncated_share"] = scores.truncated_share
            for kind, value in scores.per_type.items():
                flat[f"eval.{label}.type.{kind}"] = value
        return flat


def summarize(judged) -> ModelScores:
    """Aggregate a judged-samples table (one greedy sample per prompt) into accuracy figures."""
    if judged.empty:
        raise ValueError("cannot evaluate on an empty prompt set")
    totals = _type_totals(judged["checks"])
    satisfied = sum(v[0] for v in totals.values())
    count = sum(v[1] for v in totals.values())
    loose: dict[str, float] = {}
    if "loose_checks" in judged.columns:
        loose_totals = _type_totals(judged["loose_checks"])
        loose_count = sum(v[1] for v in loose_totals.values())
        loose = {"loose_prompt_accuracy": float(judged["loose_passed"].mean()),
                 "loose_constraint_accuracy": sum(v[0] for v in loose_totals.values()) / loose_count
                 if loose_count else 0.0}
    return ModelScores(**loose,
        prompts=len(judged),
        prompt_accuracy=float(judged["passed"].mean()),
        constraint_accuracy=satisfied / count if count else 0.0,
        per_type={kind: v[0] / v[1] for kind, v in sorted(totals.items())},
        per_type_count={kind: v[1] for kind, v in sorted(totals.items())},
        truncated_share=float((~judged["finished"].astype(bool)).mean()),
        mean_tokens=float(judged["n_tokens"].mean()),
    )


def echoed_answers(judged, prompts: Sequence[Prompt], ngram: int | None = None) -> int:
    """How many answers of a judged table copy their prompt's instructions instead of following them
    (``flywheel.verifiers.echoed_instruction``). ``prompts``: the table's prompts, by id. ``ngram``: the recipe's
    ``feedback.echo_ngram``; None (off there) counts at ``ECHO_NGRAM``."""
    ngram = ngram or ECHO_NGRAM
    by_id = {prompt.id: prompt for prompt in prompts}
    missing = set(judged["prompt_id"]) - set(by_id)
    if missing:
        raise ValueError(f"judged answers name {len(missing)} prompts that are not given, e.g. {sorted(missing)[0]!r}")
    # A prompt without constraints has no instruction to copy: echoed_instruction finds nothing for it.
    return sum(echoed_instruction(by_id[row.prompt_id].constraints, row.response, ngram=ngram) is not None
               for row in judged.itertuples())


def repetitive_answers(judged, limits: TextLimits) -> int:
    """How many answers of a judged table are degenerate repetitions, as the quality check counts them
    (``flywheel.textchecks.is_repetitive``: a word n-gram more often than the limits allow, or a loop of symbols as
    long); ``limits``: the recipe's, ``flywheel.quality.text_limits``."""
    return sum(is_repetitive(response, limits) for response in judged["response"])


def _type_totals(checks_column) -> dict[str, list[int]]:
    """Instruction type -> [satisfied, checked] over a column of JSON check maps."""
    totals: dict[str, list[int]] = {}
    for checks in checks_column:
        for kind, ok in json.loads(checks).items():
            totals.setdefault(kind, [0, 0])
            totals[kind][0] += int(ok)
            totals[kind][1] += 1
    return totals


def win_rate(candidate_scores, champion_scores) -> float:
    """Share of prompts where the candidate scores higher than the champion; ties count half. Both are mappings
    prompt_id -> score over the same prompts."""
    if set(candidate_scores) != set(champion_scores) or not candidate_scores:
        raise ValueError("candidate and champion were not scored on the same prompts")
    wins = sum(candidate_scores[p] > champion_scores[p] for p in candidate_scores)
    ties = sum(candidate_scores[p] == champion_scores[p] for p in candidate_scores)
    return (wins + 0.5 * ties) / len(candidate_scores)


def compare(candidate_judged, champion_judged) -> Evaluation:
    merged = candidate_judged.merge(champion_judged, on="prompt_id", suffixes=("_cand", "_champ"))
    # Both directions: a champion with extra prompts would skew its accuracy and so the gain.
    if len(merged) != len(candidate_judged) or len(merged) != len(champion_judged):
        raise ValueError("candidate and champion were not evaluated on the same prompts")
    wins = (merged["score_cand"] > merged["score_champ"]).sum()
    ties = (merged["score_cand"] == merged["score_champ"]).sum()
    candidate, champion = summarize(candidate_judged), summarize(champion_judged)
    changes = instruction_changes(merged["checks_cand"], merged["checks_champ"])
    return Evaluation(
        candidate=candidate,
        champion=champion,
        win_rate=float((wins + 0.5 * ties) / len(merged)),
        accuracy_gain=candidate.prompt_accuracy - champion.prompt_accuracy,
        per_type_flips=type_flips(changes),
        prompt_gain=paired_gain([(1, int(champ and not cand), int(cand and not champ))
                                 for cand, champ in zip(merged["passed_cand"], merged["passed_champ"])]),
        instruction_gain=paired_gain([(len(kinds), sum(lost for lost, _ in kinds.values()),
                                       sum(gained for _, gained in kinds.values())) for kinds in changes]),
    )


def instruction_changes(candidate_checks, champion_checks) -> list[dict[str, tuple[int, int]]]:
    """Per prompt, each instruction type checked for both models -> (lost, gained): 1 where the champion met it and
    the candidate did not, and the reverse. Paired JSON check maps, one pair per prompt."""
    changes = []
    for mine, theirs in zip(candidate_checks, champion_checks):
        mine, theirs = json.loads(mine), json.loads(theirs)
        changes.append({kind: (int(theirs[kind] and not mine[kind]), int(mine[kind] and not theirs[kind]))
                        for kind in mine.keys() & theirs.keys()})
    return changes


def paired_gain(per_prompt: list[tuple[int, int, int]], z: float = 1.959964) -> PairedGain:
    """The paired accuracy gain over prompts given as (items, lost, gained), with a 95% interval and a sign test.

    The variance is the ratio estimator's (prompts as clusters): with one item per prompt it is the usual paired
    difference of proportions. Fewer than two prompts give the widest interval: nothing is known."""
    if not per_prompt:
        raise ValueError("cannot estimate a gain on an empty prompt set")
    items = sum(m for m, _, _ in per_prompt)
    lost = sum(lo for _, lo, _ in per_prompt)
    gained = sum(g for _, _, g in per_prompt)
    gain = (gained - lost) / items if items else 0.0
    n = len(per_prompt)
    if n > 1 and items:
        spread = sum((g - lo - gain * m) ** 2 for m, lo, g in per_prompt)
        half = z * (n / (n - 1) * spread) ** 0.5 / items
        low, high = max(-1.0, gain - half), min(1.0, gain + half)
    else:
        low, high = -1.0, 1.0
    up = sum(g > lo for _, lo, g in per_prompt)
    down = sum(g < lo for _, lo, g in per_prompt)
    return PairedGain(items=items, lost=lost, gained=gained, gain=gain, ci_low=low, ci_high=high, up=up, down=down,
                      p_value=sign_test_p(up, down))  # the chance of at least `up` ups among the changed


def type_flips(changes: list[dict[str, tuple[int, int]]]) -> dict[str, list[int]]:
    """Instruction type -> [lost, gained] summed over prompts (``instruction_changes``)."""
    flips: dict[str, list[int]] = {}
    for kinds in changes:
        for kind, (lost, gained) in kinds.items():
            counts = flips.setdefault(kind, [0, 0])
            counts[0] += lost
            counts[1] += gained
    return dict(sorted(flips.items()))


def sign_test_p(lost: int, gained: int) -> float:
    """One-sided exact sign test (McNemar's exact test on the discordant pairs): the probability of at least
    ``lost`` losses among ``lost + gained`` flips if a flip were equally likely either way. 1.0 without flips."""
    from math import comb

    n = lost + gained
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(lost, n + 1)) / 2 ** n


def promotion_verdict(evaluation: Evaluation, human_approved: bool, *, min_gain: float,
                      max_type_regression: float | None, max_perplexity_increase: float | None,
                      require_human_approval: bool, min_type_support: int = 0,
                      type_regression_alpha: float | None = None,
                      gain_metric: str = "prompt", gain_alpha: float | None = None,
                      max_perplexity_increase_vs_base: float | None = None) -> tuple[bool, list[str]]:
    """Whether a candidate meets the promotion policy, with every reason it does or does not.

    With ``gain_alpha``, the gain must also be significant: the paired sign test over the prompts that changed
    (``PairedGain.p_value``) below ``gain_alpha``. A record without it (made before it was kept) is refused: a
    policy that asks for evidence does not promote without it.

    With ``type_regression_alpha``, a type's drop beyond ``max_type_regression`` refuses the candidate only when
    it is also significant: the one-sided sign test on the type's flipped instructions (lost against gained) gives
    p < alpha. A type without flip counts (an old record) is judged by the threshold alone."""
    reasons, ok = [], True
    if gain_metric == "prompt":
        gain = evaluation.accuracy_gain
    elif gain_metric == "instruction":
        gain = evaluation.candidate.constraint_accuracy - evaluation.champion.constraint_accuracy
    else:
        raise ValueError(f"unknown gain_metric {gain_metric!r} (prompt or instruction)")
    estimate = evaluation.gain_estimate(gain_metric)
    interval = "" if estimate is None else (
        f" (95% CI {estimate.ci_low:+.3f} to {estimate.ci_high:+.3f}; prompts up {estimate.up}, down "
        f"{estimate.down}, p={estimate.p_value:.3f})")
    if gain > min_gain:
        reasons.append(f"{gain_metric} accuracy gain {gain:+.3f} > min_gain {min_gain}{interval}")
    else:
        ok = False
        reasons.append(f"{gain_metric} accuracy gain {gain:+.3f} <= min_gain {min_gain}{interval}")
    if gain_alpha is not None:
        if estimate is None:
            ok = False
            reasons.append("gain significance unknown (an evaluation recorded before it was kept), gain_alpha set")
        elif estimate.p_value >= gain_alpha:
            ok = False
            reasons.append(f"gain not significant: p={estimate.p_value:.3f} >= gain_alpha {gain_alpha}")
        else:
            reasons.append(f"gain significant: p={estimate.p_value:.3f} < gain_alpha {gain_alpha}")
    if max_type_regression is not None:
        champion = evaluation.champion.per_type
        # Both models answered the same prompts, so the champion's counts are the candidate's. A record without
        # counts (made before they were kept) checks every type, as it always did.
        support = evaluation.champion.per_type_count
        thin = sorted(k for k in champion if support and support.get(k, 0) < min_type_support)
        drops = {k: champion[k] - v for k, v in evaluation.candidate.per_type.items()
                 if k in champion and k not in thin and champion[k] - v > max_type_regression + 1e-12}
        if thin:
            reasons.append(f"{len(thin)} instruction types with fewer than {min_type_support} held-out instructions "
                           f"not checked for regression: {', '.join(thin)}")
        flips = evaluation.per_type_flips if type_regression_alpha is not None else {}
        p_values = {k: sign_test_p(*flips[k]) for k in drops if k in flips}
        noise = sorted(k for k, p in p_values.items() if p >= type_regression_alpha)
        drops = {k: d for k, d in drops.items() if k not in noise}

        def described(kind: str) -> str:
            drop = f"{kind} -{champion[kind] - evaluation.candidate.per_type[kind]:.3f}"
            if kind not in p_values:
                return drop
            lost, gained = flips[kind]
            return f"{drop} (lost {lost}, gained {gained}, p={p_values[kind]:.3f})"

        if noise:
            reasons.append(f"instruction types down beyond {max_type_regression} but not significantly (sign test, "
                           f"p >= {type_regression_alpha}): {', '.join(described(k) for k in noise)}")
        if drops:
            ok = False
            worst = ", ".join(described(k) for k in sorted(drops, key=lambda k: -drops[k]))
            beyond = f"beyond {max_type_regression}" + (
                f", significant at {type_regression_alpha} (sign test)" if type_regression_alpha is not None else "")
            reasons.append(f"instruction types regressed {beyond}: {worst}")
    base = f"the base (v{evaluation.base_version})" if evaluation.base_version else "the base"
    for limit, rise, against in ((max_perplexity_increase, evaluation.perplexity_increase, "the champion"),
                                 (max_perplexity_increase_vs_base, evaluation.perplexity_increase_vs_base, base)):
        if limit is None:
            continue
        if rise is None:
            ok = False
            reasons.append(f"probe perplexity of {against} unknown: the perplexity guard cannot be checked")
        elif rise > limit:
            ok = False
            reasons.append(f"probe perplexity {rise:+.1%} against {against} > {limit:.1%}")
        else:
            reasons.append(f"probe perplexity {rise:+.1%} against {against} <= {limit:.1%}")
    if require_human_approval and not human_approved:
        ok = False
        reasons.append("a human reviewer's approval is required")
    return ok, reasons
