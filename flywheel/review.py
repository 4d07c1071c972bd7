"""The human spot-check gate: the sample a reviewer sees, and the decision record kept with the round."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # pragma: no cover
    from flywheel.quality import QualityReport

OnTimeout = Literal["reject", "approve_if_checks_passed"]
TIMEOUT_REVIEWER = "timeout"
UNKNOWN_TYPE = "unknown"
# The text a row trains on, per training table: its judge verdict is the verdict of that sample.
TRAINED_TEXT = {"pairs": "chosen", "sft": "completion", "samples": "response"}
# Fields of a decision that belong to the act of deciding, not to the data: kept out of the round's data folder so
# that a re-run with the same decision versions byte-identical data.
WALL_CLOCK_FIELDS = frozenset({"decided_at"})


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    approved: bool
    mode: Literal["auto", "human", "timeout"]
    reviewer: str
    notes: str = ""
    decided_at: str = Field(default_factory=utc_now, description="UTC ISO time of the decision.")
    sample_ids: list[str] = Field(default_factory=list, description="Row ids the reviewer was shown.")
    dropped_ids: list[str] = Field(default_factory=list)

    def data_record(self) -> dict:
        """What the round's data folder keeps (review.json): the decision without its wall-clock time."""
        return self.model_dump(mode="json", exclude=set(WALL_CLOCK_FIELDS))

    def mlflow_tags(self, prefix: str) -> dict[str, str]:
        """The decision as tags on the round's MLflow run: ``<prefix>review.approved`` and so on."""
        values = {
            "approved": str(self.approved).lower(), "mode": self.mode, "reviewer": self.reviewer,
            "decided_at": self.decided_at, "notes": self.notes, "dropped_ids": json.dumps(self.dropped_ids),
            "sample_ids": json.dumps(self.sample_ids),
        }
        # MLflow caps tag values (5000 characters on older servers): a long list keeps its head and says so.
        return {f"{prefix}review.{k}": v if len(v) <= 5000 else v[:4980] + " ...(truncated)" for k, v in values.items()}


class ReviewRejected(RuntimeError):
    """A reviewer rejected the round: nothing is trained on its data."""


# --- the sample ---------------------------------------------------------------------------------------------------

def annotate_strata(table, samples, table_name: str):
    """The training table with each row's stratum: ``instruction_type`` and the judge's ``verdict`` (pass/fail).

    The instruction type is the prompt's first constraint type, read from the judged samples' ``checks`` (constraint
    type -> satisfied, in the prompt's order); the verdict is the deciding judge's ``verdict`` (else ``passed``) of
    the judged sample whose text the row trains on (the chosen answer of a pair, the completion of an SFT row). A row
    with no judged sample falls back to its score (a sample passes when it satisfies every constraint: scores 1).
    """
    table = table.copy()
    if table.empty:
        return table.assign(instruction_type=[], verdict=[])
    types = {}
    if "checks" in samples.columns:
        for prompt_id, checks in zip(samples["prompt_id"], samples["checks"]):
            if prompt_id not in types:
                types[prompt_id] = _first_type(checks)
    table["instruction_type"] = [types.get(p, UNKNOWN_TYPE) for p in table["prompt_id"]]
    text = TRAINED_TEXT[table_name]
    if "verdict" in samples.columns:  # the deciding judge's verdict (a verifier or an LLM judge)
        labels = [str(v) for v in samples["verdict"]]
    else:
        labels = ["pass" if ok else "fail" for ok in samples["passed"]]
    judged = {(p, str(r)): label for p, r, label in zip(samples["prompt_id"], samples["response"], labels)}
    score = "chosen_score" if table_name == "pairs" else "score"
    table["verdict"] = [
        judged.get((p, str(t)), "pass" if float(s) >= 1.0 else "fail")
        for p, t, s in zip(table["prompt_id"], table[text], table[score])
    ]
    return table


def _first_type(checks) -> str:
    try:
        parsed = json.loads(checks) if isinstance(checks, str) else dict(checks)
    except (TypeError, ValueError):
        return UNKNOWN_TYPE
    return str(next(iter(parsed), UNKNOWN_TYPE)) if isinstance(parsed, dict) else UNKNOWN_TYPE


def review_sample(table, size: int, seed: int) -> list[dict]:
    """A reproducible stratified random sample of training rows.

    Strata are (instruction type, verdict) when the table carries them (see :func:`annotate_strata`). Every stratum
    gets one row before any gets a second, so a sample at least as large as the number of strata covers them all; the
    order of strata is random (seeded) but alternates failing and passing verdicts, so even a small sample shows both.
    Within a stratum, rows of prompts not yet shown come first, so one prompt cannot fill the sample.
    """
    if table.empty or size < 1:
        return []
    rng = random.Random(seed)
    records = table.sort_values("row_id").to_dict(orient="records")
    strata: dict[tuple[str, str], list[dict]] = {}
    for row in records:
        strata.setdefault(_stratum(row), []).append(row)
    queues = {key: _spread_prompts(rows, rng) for key, rows in sorted(strata.items())}

    by_verdict: dict[str, list[tuple[str, str]]] = {}
    for key in queues:
        by_verdict.setdefault(key[1], []).append(key)
    lanes = [by_verdict[v] for v in sorted(by_verdict)]
    for lane in lanes:
        rng.shuffle(lane)
    rng.shuffle(lanes)
    order = [lane[i] for i in range(max(len(lane) for lane in lanes)) for lane in lanes if i < len(lane)]

    chosen: list[dict] = []
    seen_prompts: set[str] = set()
    depth = 0
    while len(chosen) < size and any(queues.values()):
        for key in order:
            if len(chosen) == size:
                break
            queue = queues[key]
            if not queue:
                continue
            # Past the first pass over strata, prefer a row of a prompt the sample does not show yet.
            pick = 0
            if depth:
                pick = next((i for i, row in enumerate(queue) if row.get("prompt_id") not in seen_prompts), 0)
            row = queue.pop(pick)
            chosen.append(row)
            seen_prompts.add(row.get("prompt_id"))
        depth += 1
    return sorted(chosen, key=lambda r: (_stratum(r), r["row_id"]))


def _stratum(row: dict) -> tuple[str, str]:
    return str(row.get("instruction_type", UNKNOWN_TYPE)), str(row.get("verdict", UNKNOWN_TYPE))


def _spread_prompts(rows: list[dict], rng: random.Random) -> list[dict]:
    """Shuffle, then put each prompt's first row before any prompt's second."""
    shuffled = list(rows)
    rng.shuffle(shuffled)
    rank: dict[object, int] = {}
    keyed = []
    for position, row in enumerate(shuffled):
        prompt = row.get("prompt_id")
        keyed.append((rank.get(prompt, 0), position, row))
        rank[prompt] = rank.get(prompt, 0) + 1
    return [row for _, _, row in sorted(keyed, key=lambda item: item[:2])]


def strata_counts(table) -> dict[str, int]:
    """Rows per stratum, as ``type / verdict`` labels (for the reviewer's page)."""
    counts: dict[str, int] = {}
    for row in table.to_dict(orient="records"):
        label = " / ".join(_stratum(row))
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


# --- decisions ----------------------------------------------------------------------------------------------------

def auto_decision(sample_ids: list[str]) -> ReviewDecision:
    return ReviewDecision(approved=True, mode="auto", reviewer="policy:auto", notes="review.mode is auto",
                          sample_ids=sample_ids)


def automatic_checks(report: QualityReport) -> tuple[bool, str]:
    """Whether every automatic check passed: the gate passed, no expectation failed or errored, nothing quarantined."""
    failed = [f"{t.table}: {o.expectation}" + (f"({o.column})" if o.column else "")
              for t in report.tables for o in t.expectations if not o.success]
    if not report.passed:
        return False, (f"the quality gate failed ({report.failed_rows} of {report.total_rows} rows, "
                       f"bound {report.max_failed_fraction:.2%})")
    if report.errors:
        return False, f"{len(report.errors)} expectation(s) could not be evaluated"
    if failed or report.failed_rows:
        return False, (f"{report.failed_rows} row(s) failed expectations and were quarantined"
                       + (f" ({', '.join(failed[:3])})" if failed else ""))
    return True, f"all expectations passed on {report.total_rows} rows"


def timeout_decision(on_timeout: OnTimeout, timeout_s: int, report: QualityReport,
                     sample_ids: list[str]) -> ReviewDecision:
    """What happens when nobody decided within ``review.timeout_s``, recorded with reviewer ``timeout``."""
    passed, why = automatic_checks(report)
    approved = on_timeout == "approve_if_checks_passed" and passed
    if on_timeout == "reject":
        action = "rejected (review.on_timeout is reject)"
    elif approved:
        action = f"approved (review.on_timeout is approve_if_checks_passed and {why})"
    else:
        action = f"rejected (review.on_timeout is approve_if_checks_passed but {why})"
    return ReviewDecision(approved=approved, mode="timeout", reviewer=TIMEOUT_REVIEWER, sample_ids=sample_ids,
                          notes=f"no decision within {timeout_s} s: {action}")


def check_drop_ids(dropped: list[str], known: set[str]) -> None:
    unknown = sorted(set(dropped) - known)
    if unknown:
        raise ValueError(f"review drops unknown row ids: {', '.join(unknown[:5])}")


# --- the reviewer's page ------------------------------------------------------------------------------------------

def review_markdown(round_name: str, stats: dict[str, object], sample: list[dict], text_columns: list[str]) -> str:
    """The reviewer's page: the round's figures, then each sampled row in full with its stratum and verdict."""
    from flywheel.text import inline_code, table_cell

    lines = [f"# Review {round_name}", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| {table_cell(key)} | {table_cell(value)} |" for key, value in stats.items()]
    lines += ["", f"## Sample ({len(sample)} rows)", ""]
    for row in sample:
        lines.append(f"### {inline_code(row['row_id'])}")
        if "instruction_type" in row or "verdict" in row:
            lines.append(f"**Instruction type:** {row.get('instruction_type', UNKNOWN_TYPE)} · "
                         f"**judge verdict:** {row.get('verdict', UNKNOWN_TYPE)}")
        lines.append(f"**Prompt:** {_quote(row['prompt'])}")
        for column in text_columns:
            if column in row:
                lines.append(f"**{column}** (score {row.get(column + '_score', row.get('score', '-'))}):")
                lines.append(f"> {_quote(str(row[column]))}")
        lines.append("")
    lines.append("Approve or reject in the run's *Resume* form (or `flywheel review`), optionally listing row ids to drop.")
    return "\n".join(lines)


def _quote(text: str) -> str:
    # Prompts and outputs are data: escaped, they show as written and never become HTML, links or markup.
    from flywheel.text import escape_markdown

    return escape_markdown(text).replace("\n", "\n> ")
