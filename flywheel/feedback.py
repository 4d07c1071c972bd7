"""Feedback: judges score every generated sample. Judged samples are one table, one row per sample.

The verifier goes first; an LLM judge (``self`` or ``teacher``, see ``flywheel.judges``) decides the rows the
verifier cannot check (prompts without verifiable constraints), or every row with ``llm_scope="all"``. Wherever
both judged a row, the table keeps both verdicts, and their agreement is the round's measure of how far the LLM
judge can be trusted. Rows with no verdict stay in the table (``verdict == "none"``) but never become training data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flywheel.generation import Completion
from flywheel.judges import Judge, JudgeError, JudgeVerdict, VerifierJudge
from flywheel.prompts import Prompt

SAMPLE_COLUMNS = [
    "row_id", "prompt_id", "prompt", "sample_index", "response", "n_tokens", "finished", "score", "passed", "checks",
    "judge", "verdict", "critique", "llm_verdict", "llm_critique",
]
# verdict / llm_verdict values; llm_verdict is "" where no LLM judge looked at the row.
PASS, FAIL, NONE = "pass", "fail", "none"


def verdict_label(passed: bool | None) -> str:
    return NONE if passed is None else (PASS if passed else FAIL)


@dataclass(frozen=True)
class JudgedTable:
    frame: Any  # pandas DataFrame with SAMPLE_COLUMNS
    agreement: float | None  # share of rows judged by both where the LLM judge's verdict equals the verifier's
    agreement_rows: int  # rows that share counts (both judges gave a verdict)
    no_verdict: int  # rows whose deciding judge gave no verdict
    llm_rows: int  # rows the LLM judge looked at (decided, or only for agreement)
    llm_no_verdict: int


def judge_table(
    prompts: Sequence[Prompt],
    completions: Sequence[Completion],
    *,
    strict: bool = True,
    llm: Judge | None = None,
    verifier_decides: bool = True,
    llm_scope: Literal["unverifiable", "all"] = "unverifiable",
    agreement_sample: int = 0,
    seed: int = 0,
    echo_ngram: int | None = None,
) -> JudgedTable:
    """Judge every completion; one row each, in the order given.

    ``verifier_decides``: the verifier's verdict counts on rows it can check (``verifier`` is among the judges).
    ``agreement_sample``: with ``llm_scope="unverifiable"``, this many verifiable rows (a seeded random choice) are
    also judged by the LLM judge, only to measure agreement; the verifier still decides them.
    ``echo_ngram``: the verifier fails answers that copy their instructions (``VerifierJudge``).
    """
    import pandas as pd

    verifier = VerifierJudge(strict=strict, echo_ngram=echo_ngram)
    items = [(prompts[c.request_index], c.text) for c in completions]
    checked = verifier.judge_with_checks(items)
    verifiable = [i for i, (prompt, _) in enumerate(items) if prompt.constraints]

    decided_by_llm = {i for i, (prompt, _) in enumerate(items)
                      if llm_decides(prompt, llm is not None, verifier_decides, llm_scope)}
    extra: list[int] = []
    if llm is not None and llm_scope == "unverifiable" and verifier_decides:
        extra = sorted(random.Random(seed).sample(verifiable, min(agreement_sample, len(verifiable))))
    llm_rows = sorted(decided_by_llm | set(extra))
    llm_verdicts: dict[int, JudgeVerdict] = {}
    if llm is not None and llm_rows:
        verdicts = llm.judge([items[i] for i in llm_rows])
        if len(verdicts) != len(llm_rows):
            raise JudgeError(f"{llm.name} judge ({llm.source}): returned {len(verdicts)} verdicts "
                             f"for {len(llm_rows)} rows")
        llm_verdicts = dict(zip(llm_rows, verdicts))

    rows = []
    agree = both = 0
    for i, (completion, (prompt, response)) in enumerate(zip(completions, items)):
        by_verifier, checks = checked[i]
        second = llm_verdicts.get(i)
        decision = second if i in decided_by_llm and second is not None else by_verifier
        if second is not None and second.passed is not None and by_verifier.passed is not None:
            both += 1
            agree += second.passed == by_verifier.passed
        rows.append({
            "row_id": f"{prompt.id}-s{completion.sample_index}",
            "prompt_id": prompt.id,
            "prompt": prompt.prompt,
            "sample_index": completion.sample_index,
            "response": response,
            "n_tokens": completion.n_tokens,
            "finished": completion.finished,
            "score": float(decision.score),
            "passed": decision.passed is True,
            "checks": json.dumps({c.type: ok for c, ok in zip(prompt.constraints, checks)}),
            "judge": decision.judge,
            "verdict": verdict_label(decision.passed),
            "critique": decision.critique,
            "llm_verdict": "" if second is None else verdict_label(second.passed),
            "llm_critique": "" if second is None else second.critique,
        })
    frame = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    if frame.empty:  # keep the column types of a filled table
        frame = frame.astype({"score": float, "passed": bool, "finished": bool})
    return JudgedTable(
        frame=frame,
        agreement=agree / both if both else None,
        agreement_rows=both,
        no_verdict=int((frame["verdict"] == NONE).sum()),
        llm_rows=len(llm_verdicts),
        llm_no_verdict=sum(1 for v in llm_verdicts.values() if v.passed is None),
    )


def llm_decides(prompt: Prompt, has_llm: bool, verifier_decides: bool,
                llm_scope: Literal["unverifiable", "all"]) -> bool:
    """Whether the LLM judge (not the verifier) decides a row of this prompt."""
    return has_llm and (llm_scope == "all" or not verifier_decides or not prompt.constraints)


def check_verdicts(judged: JudgedTable, max_no_verdict: float, llm: Judge | None = None) -> None:
    """Stop when a judge left too many rows without a verdict (above ``max_no_verdict``), naming the judge."""
    if llm is not None and judged.llm_rows and judged.llm_no_verdict / judged.llm_rows > max_no_verdict:
        raise JudgeError(
            f"{llm.name} judge ({llm.source}): no verdict for {judged.llm_no_verdict} of {judged.llm_rows} rows "
            f"({judged.llm_no_verdict / judged.llm_rows:.0%}), above quality.max_failed_fraction {max_no_verdict:g}; "
            "its critiques must end with a line 'VERDICT: PASS' or 'VERDICT: FAIL'"
        )
    rows = len(judged.frame)
    if rows and judged.no_verdict / rows > max_no_verdict:
        deciders = judged.frame.loc[judged.frame["verdict"] == NONE, "judge"].value_counts()
        name = str(deciders.index[0])
        raise JudgeError(f"{name} judge: no verdict for {judged.no_verdict} of {rows} samples "
                         f"({judged.no_verdict / rows:.0%}), above quality.max_failed_fraction {max_no_verdict:g}")


def judge_with_verifiers(prompts: Sequence[Prompt], completions: Sequence[Completion], *, strict: bool = True):
    """Programmatic verifiers: per-constraint pass/fail and the share satisfied, for every sample."""
    return judge_table(prompts, completions, strict=strict).frame


class RoundJudge:
    """The round's judges as one ``Judge`` over any (prompt, response) pairs, deciding each pair the way
    ``judge_table`` decides a sample: the verifier where it can check (and ``verifier_decides``), the other judge
    for the rest (or for everything with ``llm_scope="all"``). Strategies use it to judge the answers they make."""

    def __init__(self, *, strict: bool = True, llm: Judge | None = None, verifier_decides: bool = True,
                 llm_scope: Literal["unverifiable", "all"] = "unverifiable", echo_ngram: int | None = None):
        self.verifier = VerifierJudge(strict=strict, echo_ngram=echo_ngram)
        self.llm = llm
        self.verifier_decides = verifier_decides
        self.llm_scope = llm_scope
        self.name = "+".join(n for n in ("verifier" if verifier_decides else "", llm.name if llm else "") if n)
        self.source = self.verifier.source if llm is None else f"{self.verifier.source}; {llm.source}"

    def _llm_decides(self, prompt: Prompt) -> bool:
        return llm_decides(prompt, self.llm is not None, self.verifier_decides, self.llm_scope)

    def deterministic_for(self, items: Sequence[tuple[Prompt, str]]) -> bool:
        """True when only the (deterministic) verifier decides these pairs: asking again gives the same verdicts."""
        return not any(self._llm_decides(prompt) for prompt, _ in items)

    def judge(self, items: Sequence[tuple[Prompt, str]]) -> list[JudgeVerdict]:
        verdicts = self.verifier.judge(items)
        to_llm = [i for i, (prompt, _) in enumerate(items) if self._llm_decides(prompt)]
        if to_llm:
            assert self.llm is not None
            second = self.llm.judge([items[i] for i in to_llm])
            if len(second) != len(to_llm):
                raise JudgeError(f"{self.llm.name} judge ({self.llm.source}): returned {len(second)} verdicts "
                                 f"for {len(to_llm)} rows")
            for i, verdict in zip(to_llm, second):
                verdicts[i] = verdict
        return verdicts
