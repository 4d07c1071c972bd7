"""Notifications through Prefect automations: a webhook block, and automations on a failed flywheel run, a round
paused for review, and a champion that moved (promotion or rollback).

The server's automation services do the sending, so this works for runs started anywhere (served deployments,
workers, `flywheel run` against the server). Promotions are custom events emitted where the alias moves.
"""

from __future__ import annotations

from typing import Any

from flywheel.registry import Promotion

PROMOTED_EVENT = "flywheel.model.promoted"
ROLLED_BACK_EVENT = "flywheel.model.rolled-back"
WEBHOOK_BLOCK = "flywheel-notifications"
FLYWHEEL_FLOWS = ["flywheel", "flywheel-round", "flywheel-scheduled-round", "flywheel-evaluate", "flywheel-promote"]
ROUND_FLOWS = ["flywheel-round"]


def emit_champion_changed(promotion: Promotion, *, rollback: bool = False) -> None:
    """Tell the server that `champion` moved; a no-op for a candidate the policy did not promote."""
    if not promotion.promoted:
        return
    from prefect.events import emit_event

    emit_event(
        event=ROLLED_BACK_EVENT if rollback else PROMOTED_EVENT,
        resource={"prefect.resource.id": f"flywheel.model.{promotion.name}", "prefect.resource.name": promotion.name},
        payload={"name": promotion.name, "version": promotion.version, "previous": promotion.previous or "",
                 "reason": promotion.reason},
    )


def announce_champion_change(promotion: Promotion, *, rollback: bool = False) -> None:
    """From outside a flow run (the CLI): emit the event and wait until it has been sent, when a server is set."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value() or not promotion.promoted:
        return
    from prefect.events.worker import EventsWorker

    emit_champion_changed(promotion, rollback=rollback)
    EventsWorker.drain_all(timeout=30)


def _flow_related(names: list[str]) -> dict[str, Any]:
    return {"prefect.resource.role": "flow", "prefect.resource.name": names}


def automation_specs() -> list[dict[str, Any]]:
    """Name, expected events, related-resource match and message of each automation."""
    run = "{{ flow.name }} run {{ flow_run.name }}"
    return [
        {"name": "flywheel: run failed", "expect": ["prefect.flow-run.Failed", "prefect.flow-run.Crashed"],
         "match": {"prefect.resource.id": "prefect.flow-run.*"}, "match_related": _flow_related(FLYWHEEL_FLOWS),
         "subject": "flywheel: run failed",
         "body": f"{run} is {{{{ flow_run.state.name }}}}: {{{{ flow_run.state.message }}}}"},
        {"name": "flywheel: round paused for review", "expect": ["prefect.flow-run.Paused"],
         "match": {"prefect.resource.id": "prefect.flow-run.*"}, "match_related": _flow_related(ROUND_FLOWS),
         "subject": "flywheel: round waiting for review",
         "body": f"{run} is paused for review: decide in the Prefect UI or with `flywheel review`"},
        {"name": "flywheel: champion changed", "expect": [PROMOTED_EVENT, ROLLED_BACK_EVENT],
         "match": {"prefect.resource.id": "flywheel.model.*"}, "match_related": {},
         "subject": "flywheel: champion changed",
         "body": "{{ event.event }}: {{ event.payload.name }} champion is now v{{ event.payload.version }} "
                 "(was v{{ event.payload.previous }}): {{ event.payload.reason }}"},
    ]


def install_notifications(webhook_url: str) -> list[str]:
    """Save the webhook block and (re)create the automations; returns their names. Needs a Prefect server."""
    from prefect import get_client
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block = CustomWebhookNotificationBlock(
        name="flywheel", url=webhook_url, json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )
    block_id = block.save(WEBHOOK_BLOCK, overwrite=True)
    names = []
    with get_client(sync_client=True) as client:
        for spec in automation_specs():
            for existing in client.read_automations_by_name(spec["name"]):
                client.delete_automation(existing.id)
            Automation(
                name=spec["name"],
                trigger=EventTrigger(expect=set(spec["expect"]), match=spec["match"],
                                     match_related=spec["match_related"], posture=Posture.Reactive, threshold=1),
                actions=[SendNotification(block_document_id=block_id, subject=spec["subject"], body=spec["body"])],
            ).create()
            names.append(spec["name"])
    return names
