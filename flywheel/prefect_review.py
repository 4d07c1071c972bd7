"""Finding rounds paused for review and resuming them, from outside the flow (the CLI, tests, scripts).

This module talks to the Prefect API (the embedded one under the workspace's Prefect home, or a server), so it is
the one library module that imports Prefect; the flows never depend on it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

ROUND_FLOW = "flywheel-round"


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


def review_page(flow_run_id: str) -> str | None:
    """The markdown sample the round published for its reviewers."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]), type=ArtifactFilterType(any_=["markdown"]),
        ))
    pages = [a.data for a in artifacts if a.key and a.key.startswith("review-")]
    return pages[-1] if pages else None


def resume_round(flow_run_id: str, *, approve: bool, reviewer: str, notes: str = "",
                 drop_row_ids: list[str] | None = None) -> None:
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    if not reviewer.strip():
        raise ValueError("a review needs a reviewer name")
    if flow_run_id not in {p.flow_run_id for p in paused_rounds()}:
        raise ValueError(f"flow run {flow_run_id} is not a round waiting for review")
    resume_flow_run(UUID(flow_run_id), run_input={
        "approve": approve, "reviewer": reviewer, "notes": notes, "drop_row_ids": list(drop_row_ids or []),
    })
