"""The human spot-check gate: the sample a reviewer sees, and the decision record kept with the round."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    approved: bool
    mode: Literal["auto", "human"]
    reviewer: str
    notes: str = ""
    decided_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    sample_ids: list[str] = Field(default_factory=list, description="Row ids the reviewer was shown.")
    dropped_ids: list[str] = Field(default_factory=list)


class ReviewRejected(RuntimeError):
    """A reviewer rejected the round: nothing is trained on its data."""


def review_sample(table, size: int, seed: int) -> list[dict]:
    """A reproducible random sample of training rows, stratified by prompt so one prompt cannot fill it."""
    if table.empty:
        return []
    per_prompt = table.groupby("prompt_id", sort=True).sample(n=1, random_state=seed)
    chosen = per_prompt.sample(n=min(size, len(per_prompt)), random_state=seed)
    return chosen.sort_values("row_id").to_dict(orient="records")


def auto_decision(sample_ids: list[str]) -> ReviewDecision:
    return ReviewDecision(approved=True, mode="auto", reviewer="policy:auto", notes="review.mode is auto",
                          sample_ids=sample_ids)


def check_drop_ids(dropped: list[str], known: set[str]) -> None:
    unknown = sorted(set(dropped) - known)
    if unknown:
        raise ValueError(f"review drops unknown row ids: {', '.join(unknown[:5])}")


def review_markdown(round_name: str, stats: dict[str, object], sample: list[dict], text_columns: list[str]) -> str:
    """The reviewer's page: the round's figures, then each sampled row in full."""
    lines = [f"# Review {round_name}", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in stats.items()]
    lines += ["", f"## Sample ({len(sample)} rows)", ""]
    for row in sample:
        lines.append(f"### `{row['row_id']}`")
        lines.append(f"**Prompt:** {_quote(row['prompt'])}")
        for column in text_columns:
            if column in row:
                lines.append(f"**{column}** (score {row.get(column + '_score', row.get('score', '-'))}):")
                lines.append(f"> {_quote(str(row[column]))}")
        lines.append("")
    lines.append("Approve or reject in the run's *Resume* form (or `flywheel review`), optionally listing row ids to drop.")
    return "\n".join(lines)


def _quote(text: str) -> str:
    return text.replace("\n", "\n> ")
