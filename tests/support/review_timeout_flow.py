"""Run with a Prefect home in the environment: three rounds' review gates, each left to time out, one per
review.on_timeout action, in a small flow that runs a task after the gate. Prints one JSON line per case."""

from __future__ import annotations

import json
import sys

from prefect import flow, task

from flywheel.config import FlywheelConfig, ReviewConfig
from flywheel.quality import ExpectationOutcome, QualityReport, TableReport
from flywheel.stages import QualityResult, RoundData
from tasks.review import await_review

TIMEOUT_S = 2


def quality(failed_rows: int) -> QualityResult:
    outcome = ExpectationOutcome(expectation="expect_column_value_lengths_to_be_between", column="chosen",
                                 success=failed_rows == 0, unexpected_count=failed_rows)
    report = QualityReport(tables=[TableReport(table="pairs", rows=10, failed_rows=failed_rows,
                                               success=failed_rows == 0, expectations=[outcome])],
                           total_rows=10, failed_rows=failed_rows, failed_fraction=failed_rows / 10,
                           max_failed_fraction=0.5, passed=True, gx_run_id="check")
    clean = RoundData(samples_path="s", pairs_path="p", sft_path="f", samples=10, pairs=10 - failed_rows, sft=0)
    return QualityResult(report=report, quarantine_path="q", clean=clean, quarantined=failed_rows)


@task
def after_the_gate(approved: bool) -> str:
    return "train" if approved else "stop"


@flow(name="review-timeout-check")
def gate(on_timeout: str, failed_rows: int) -> dict:
    config = FlywheelConfig(review=ReviewConfig(mode="required", timeout_s=TIMEOUT_S, on_timeout=on_timeout))
    decision = await_review(config, quality(failed_rows), ["p1-pair", "p2-pair"])
    return {"decision": decision.model_dump(mode="json"), "next": after_the_gate(decision.approved)}


if __name__ == "__main__":
    for case in sys.argv[1:]:
        on_timeout, failed_rows = case.split(":")
        state = gate(on_timeout, int(failed_rows), return_state=True)
        print(json.dumps({"case": case, "state": state.type.value, "result": state.result(raise_on_failure=False)
                          if state.is_completed() else str(state.message)}), flush=True)
