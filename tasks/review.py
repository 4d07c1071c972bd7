from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.dataset import read_table
from flywheel.prefect_review import REVIEW_ARTIFACT_PREFIX
from flywheel.review import ReviewDecision, auto_decision, review_markdown, review_sample

REVIEW_KEY = "flywheel-review"


class ReviewInput(RunInput):
    """The reviewer's form in the Prefect UI (and what `flywheel review` submits)."""

    approve: bool = Field(description="Approve this round's data for training (unchecked: reject the round).")
    reviewer: str = Field(min_length=1, description="Who decided.")
    notes: str = Field("", description="Why; kept with the round.")
    drop_row_ids: list[str] = Field(default_factory=list, description="Row ids to drop from training.")


@task(name="publish-review-sample")
def publish_review_sample(config: FlywheelConfig, context: stages.RoundContext, judged: stages.JudgedSamples,
                          quality: stages.QualityResult) -> list[str]:
    table_name = stages.training_table(config)
    table = read_table(Path(getattr(quality.clean, f"{table_name}_path")))
    sample = review_sample(table, config.review.sample_size, seed=config.seed + context.number)
    stats = {
        "round": context.name, "parent version": context.champion.version, "samples": judged.rows,
        "sample pass rate": f"{judged.pass_rate:.3f}", "pairs (clean)": quality.clean.pairs,
        "sft rows (clean)": quality.clean.sft, "quarantined": quality.quarantined,
        "failed share": f"{quality.report.failed_fraction:.3f}",
    }
    columns = ["chosen", "rejected"] if table_name == "pairs" else ["completion"]
    create_markdown_artifact(review_markdown(context.name, stats, sample, columns), key=f"{REVIEW_ARTIFACT_PREFIX}{context.name}",
                             description=f"Spot-check sample of {context.name}")
    return [row["row_id"] for row in sample]


def await_review(config: FlywheelConfig, sample_ids: list[str]) -> ReviewDecision:
    """Called in the flow body: pausing is a flow-run operation."""
    if config.review.mode == "auto":
        return auto_decision(sample_ids)
    answer = pause_flow_run(
        # Approval must be an explicit act: the form starts unapproved and with no reviewer name.
        wait_for_input=ReviewInput.with_initial_data(approve=False, reviewer="", notes="", drop_row_ids=[]),
        timeout=config.review.timeout_s,
        key=REVIEW_KEY,
    )
    return ReviewDecision(approved=answer.approve, mode="human", reviewer=answer.reviewer, notes=answer.notes,
                          sample_ids=sample_ids, dropped_ids=answer.drop_row_ids)


@task(name="record-review")
def record_review(config: FlywheelConfig, context: stages.RoundContext, quality: stages.QualityResult,
                  decision: ReviewDecision) -> ReviewDecision:
    return stages.apply_review(config, context, quality, decision)
