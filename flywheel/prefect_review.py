"""Finding rounds paused for review and resuming them, from outside the flow (the CLI, tests, scripts).

This module talks to the Prefect API (the embedded one under the workspace's Prefect home, or a server), so it is
the one library module that imports Prefect; the flows never depend on it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

ROUND_FLOW = "flywheel-round"
REVIEW_ARTIFACT_PREFIX = "review-"


class PausedRound(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    flow_run_id: str
    name: str
    paused_at: str
    expires_at: str = ""
    expired: bool = False


def paused_rounds() -> list[PausedRound]:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[ROUND_FLOW])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))),
        )
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    rounds = []
    for run in runs:
        expires = run.state.state_details.pause_timeout if run.state else None
        rounds.append(PausedRound(flow_run_id=str(run.id), name=run.name,
                                  paused_at=str(run.state.timestamp if run.state else ""),
                                  expires_at=str(expires or ""), expired=bool(expires and expires < now)))
    return rounds


def _review_artifacts(flow_run_id: str) -> list:
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]), type=ArtifactFilterType(any_=["markdown"]),
        ))
    return [a for a in artifacts if a.key and a.key.startswith(REVIEW_ARTIFACT_PREFIX)]


def review_page(flow_run_id: str) -> str | None:
    """The markdown sample the round published for its reviewers."""
    pages = _review_artifacts(flow_run_id)
    return pages[-1].data if pages else None


def paused_round_name(flow_run_id: str) -> str | None:
    """Which round (e.g. 'round-0001') a paused run is reviewing, from the key of the sample it published."""
    pages = _review_artifacts(flow_run_id)
    return pages[-1].key[len(REVIEW_ARTIFACT_PREFIX):] if pages else None


def resume_round(flow_run_id: str, *, approve: bool, reviewer: str, notes: str = "",
                 drop_row_ids: list[str] | None = None, known_row_ids: set[str] | None = None) -> None:
    """Submit the reviewer's decision; bad input is refused here, while the run is still paused."""
    from uuid import UUID

    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import resume_flow_run

    from flywheel.review import check_drop_ids

    if not reviewer.strip():
        raise ValueError("a review needs a reviewer name")
    paused = {p.flow_run_id: p for p in paused_rounds()}
    if flow_run_id not in paused:
        raise ValueError(f"flow run {flow_run_id} is not a round waiting for review")
    if paused[flow_run_id].expired:
        raise ValueError(f"the review of flow run {flow_run_id} timed out at {paused[flow_run_id].expires_at}: "
                         f"the round applies review.on_timeout")
    if drop_row_ids and known_row_ids is not None:
        check_drop_ids(list(drop_row_ids), known_row_ids)
    try:
        resume_flow_run(UUID(flow_run_id), run_input={
            "approve": approve, "reviewer": reviewer, "notes": notes, "drop_row_ids": list(drop_row_ids or []),
        })
    except FlowPauseTimeout:
        raise ValueError(f"the review of flow run {flow_run_id} timed out: "
                         f"the round applies review.on_timeout") from None


def reclaim_timed_out_run(flow_run_id, message: str) -> None:
    """Set a run whose review pause timed out back to Running, so the round can act on review.on_timeout.

    Prefect fails a pause past its timeout (the API refuses any other way out of it, and a server's pause-expiration
    service marks it Failed), and a Failed run cannot run tasks; the round's own timeout decision takes over instead.
    """
    from prefect import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(message=message), force=True)


def resumed_at(flow_run_id) -> str | None:
    """When a resumed run left its pause (its current state's time), as a UTC ISO time; None if it is not running."""
    from datetime import timezone

    from prefect import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    if state is None or not state.is_running() or state.timestamp is None:
        return None
    return state.timestamp.astimezone(timezone.utc).isoformat(timespec="seconds")
