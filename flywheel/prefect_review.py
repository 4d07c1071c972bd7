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
    return [PausedRound(flow_run_id=str(r.id), name=r.name, paused_at=str(r.state.timestamp if r.state else ""))
            for r in runs]


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

    from prefect.flow_runs import resume_flow_run

    from flywheel.review import check_drop_ids

    if not reviewer.strip():
        raise ValueError("a review needs a reviewer name")
    if flow_run_id not in {p.flow_run_id for p in paused_rounds()}:
        raise ValueError(f"flow run {flow_run_id} is not a round waiting for review")
    if drop_row_ids and known_row_ids is not None:
        check_drop_ids(list(drop_row_ids), known_row_ids)
    resume_flow_run(UUID(flow_run_id), run_input={
        "approve": approve, "reviewer": reviewer, "notes": notes, "drop_row_ids": list(drop_row_ids or []),
    })
