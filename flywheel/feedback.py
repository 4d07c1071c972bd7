"""Feedback: judges score every generated sample. Judged samples are one table, one row per sample."""

from __future__ import annotations

import json
from collections.abc import Sequence

from flywheel.generation import Completion
from flywheel.prompts import Prompt
from flywheel.verifiers import verify

SAMPLE_COLUMNS = [
    "row_id", "prompt_id", "prompt", "sample_index", "response", "n_tokens", "finished", "score", "passed", "checks",
]


def judge_with_verifiers(prompts: Sequence[Prompt], completions: Sequence[Completion], *, strict: bool = True):
    """Programmatic verifiers: per-constraint pass/fail and the share satisfied, for every sample."""
    import pandas as pd

    rows = []
    for completion in completions:
        prompt = prompts[completion.request_index]
        verdict = verify(prompt.constraints, completion.text, strict=strict)
        rows.append({
            "row_id": f"{prompt.id}-s{completion.sample_index}",
            "prompt_id": prompt.id,
            "prompt": prompt.prompt,
            "sample_index": completion.sample_index,
            "response": completion.text,
            "n_tokens": completion.n_tokens,
            "finished": completion.finished,
            "score": float(verdict.score),
            "passed": bool(verdict.passed),
            "checks": json.dumps({c.type: ok for c, ok in zip(prompt.constraints, verdict.checks)}),
        })
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
