"""Training prompts that lean toward what the model fails and the round's data can teach (``prompts.focus``).

A round answers ``prompts.per_round`` training prompts. Unfocused, they are consecutive windows of one seeded order
(``flywheel.prompts.sample_round_prompts``), so every instruction type comes up as often as the pool holds it. But a
round's samples show that some types fail on nearly every sample while the strategy turns those failures into
training rows (the repair strategy fixes letter case, commas and quotation marks mechanically), and others fail with
nothing to learn from (no sample passes and no fix exists) or pass already. ``teachable_failure`` scores each type by
the first kind, from the latest finished round's samples and clean training rows: training data only, never the
held-out prompts. ``focused_round_prompts`` then draws the round's prompts, ones not answered in earlier rounds,
with weights ``1 + focus x`` their types' mean score (weighted sampling without replacement, seeded per prompt).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from flywheel.prompts import Prompt, unit_hash


def teachable_failure(checks: Iterable[tuple[str, Mapping[str, bool]]], taught: set[str]) -> dict[str, float]:
    """Per instruction type, in [0, 1]: over the prompts that carry it, the mean share of their samples that failed
    it, where a prompt counts only when the round made at least one clean training row of it (``taught``: prompt ids).

    ``checks`` holds one ``(prompt_id, {type: passed})`` per judged sample. 1.0: every sample failed the type and
    every such prompt became training data; 0.0: the samples met it, or no failing prompt was taught.
    """
    failed: dict[tuple[str, str], list[int]] = {}  # (prompt, type) -> [failed samples, samples]
    for prompt_id, verdicts in checks:
        for kind, passed in verdicts.items():
            counts = failed.setdefault((prompt_id, kind), [0, 0])
            counts[0] += not passed
            counts[1] += 1
    per_type: dict[str, list[float]] = {}
    for (prompt_id, kind), (misses, samples) in failed.items():
        per_type.setdefault(kind, []).append(misses / samples if prompt_id in taught else 0.0)
    return {kind: sum(shares) / len(shares) for kind, shares in sorted(per_type.items())}


def prompt_weight(prompt: Prompt, scores: Mapping[str, float], focus: float) -> float:
    """``1 + focus x`` the mean score of the prompt's instruction types; a type the scores lack counts as their mean
    (the round that made them did not meet it: no evidence either way)."""
    if focus < 0:
        raise ValueError(f"prompt_weight: focus must be >= 0, got {focus}")
    unknown = sum(scores.values()) / len(scores) if scores else 0.0
    mean = sum(scores.get(c.type, unknown) for c in prompt.constraints) / len(prompt.constraints)
    return 1.0 + focus * mean


def focused_round_prompts(train: Sequence[Prompt], k: int, round_index: int, scores: Mapping[str, float],
                          focus: float, answered: set[str], seed: int = 0) -> list[Prompt]:
    """``k`` training prompts for round ``round_index``, drawn without replacement with ``prompt_weight``s from the
    prompts not in ``answered`` (ids of earlier rounds' prompts; all of ``train`` again once fewer than ``k`` are
    left). Efraimidis-Spirakis keys ``log(u) / weight`` with ``u`` a stable hash of (seed, round, id): the same
    inputs draw the same prompts whatever their order, and focus 0 draws uniformly."""
    if k < 1:
        raise ValueError(f"focused_round_prompts: k must be >= 1, got {k}")
    if not train:
        raise ValueError("focused_round_prompts: no training prompts to sample from")
    fresh = [p for p in train if p.id not in answered]
    pool = fresh if len(fresh) >= k else list(train)

    def key(prompt: Prompt) -> tuple[float, str]:
        unit = unit_hash("focus", seed, f"{round_index}\x00{prompt.id}")
        return math.log(max(unit, 1e-300)) / prompt_weight(prompt, scores, focus), prompt.id

    return sorted(pool, key=key, reverse=True)[:k]
