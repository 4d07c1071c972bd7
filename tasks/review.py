from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.dataset import read_table
from flywheel.prefect_review import REVIEW_ARTIFACT_PREFIX, reclaim_timed_out_run, resumed_at
from flywheel.review import (
    TRAINED_TEXT, ReviewDecision, annotate_strata, auto_decision, review_markdown, review_sample, strata_counts,
    timeout_decision,
)
from flywheel.workspace import Workspace

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
    table = annotate_strata(read_table(Path(getattr(quality.clean, f"{table_name}_path"))),
                            read_table(Path(judged.path)), table_name)
    sample = review_sample(table, config.review.sample_size, seed=config.seed + context.number)
    strata = strata_counts(table)
    stats = {
        "round": context.name, "parent version": context.champion.version, "samples": judged.rows,
        "sample pass rate": f"{judged.pass_rate:.3f}", "pairs (clean)": quality.clean.pairs,
        "sft rows (clean)": quality.clean.sft, "quarantined": quality.quarantined,
        "failed share": f"{quality.report.failed_fraction:.3f}",
        "sample": f"{len(sample)} of {len(table)} {table_name} rows, {len(strata)} strata (instruction type / verdict)",
        **{f"stratum {label}": rows for label, rows in strata.items()},
    }
    columns = ["chosen", "rejected"] if table_name == "pairs" else [TRAINED_TEXT[table_name]]
    create_markdown_artifact(review_markdown(context.name, stats, sample, columns), key=f"{REVIEW_ARTIFACT_PREFIX}{context.name}",
                             description=f"Spot-check sample of {context.name}")
    return [row["row_id"] for row in sample]


def await_review(config: FlywheelConfig, quality: stages.QualityResult, sample_ids: list[str]) -> ReviewDecision:
    """Called in the flow body: pausing is a flow-run operation. Past review.timeout_s, review.on_timeout decides."""
    review = config.review
    if review.mode == "auto":
        return auto_decision(sample_ids)
    try:
        answer = pause_flow_run(
            # Approval must be an explicit act: the form starts unapproved and with no reviewer name.
            wait_for_input=ReviewInput.with_initial_data(approve=False, reviewer="", notes="", drop_row_ids=[]),
            timeout=review.timeout_s,
            poll_interval=max(1, min(10, review.timeout_s // 10)),
            key=REVIEW_KEY,
        )
    except FlowPauseTimeout:
        decision = timeout_decision(review.on_timeout, review.timeout_s, quality.report, sample_ids)
        # Prefect fails a pause that times out; the round takes its run back and acts on the recorded decision.
        reclaim_timed_out_run(FlowRunContext.get().flow_run.id, f"review timed out: {decision.notes}")
        get_run_logger().warning(f"review timed out: {decision.notes}")
        return decision
    # When the reviewer submitted (the run's Resumed state), not when this poll noticed it.
    submitted = resumed_at(FlowRunContext.get().flow_run.id)
    return ReviewDecision(approved=answer.approve, mode="human", reviewer=answer.reviewer, notes=answer.notes,
                          sample_ids=sample_ids, dropped_ids=answer.drop_row_ids, **({"decided_at": submitted}
                                                                                       if submitted else {}))


@task(name="record-review")
def record_review(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext,
                  quality: stages.QualityResult, judged: stages.JudgedSamples,
                  decision: ReviewDecision) -> ReviewDecision:
    # The reviewer is a judge too: how far their verdicts agree with the round's, before dropped rows move.
    stages.log_metrics(workspace, context.run_id, stages.human_agreement(config, quality, judged, decision))
    decision = stages.apply_review(config, context, quality, decision)
    stages.tag_review(workspace, context, decision)
    return decision
