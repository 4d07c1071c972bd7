"""One flywheel round: generate -> judge -> build data -> quality gate -> review gate -> version -> train ->
evaluate -> register -> promote, with the round's manifest written last."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flywheel.config import FlywheelConfig
from flywheel.stages import RoundContext, RoundRecord, fail_round
from flywheel.workspace import Workspace
from tasks.build import build_data
from tasks.evaluate import evaluate
from tasks.feedback import judge
from tasks.generate import generate, load_prompts
from tasks.quality import quality_gate
from tasks.register import close_round, promote, register
from tasks.review import await_review, publish_review_sample, record_review
from tasks.setup import open_round, prepare_workspace, resolve_champion
from tasks.train import train
from tasks.version import version_dataset


@flow(name="flywheel-round")
def flywheel_round(config: FlywheelConfig = FlywheelConfig(), workspace: str | None = None) -> RoundRecord:
    ws = prepare_workspace(config, Workspace.from_config(config, workspace))
    champion = resolve_champion(config, ws)
    context = open_round(config, ws, champion)
    try:
        return run_stages(config, ws, context)
    except BaseException as error:
        # The round's MLflow run says why it failed; a re-run of the round opens a fresh one.
        fail_round(ws, context, error)
        raise


def run_stages(config: FlywheelConfig, ws: Workspace, context: RoundContext) -> RoundRecord:
    split = load_prompts(config, ws, context)
    generations = generate(config, context, split)
    judged = judge(config, context, split, generations)
    data = build_data(config, context, judged)
    quality = quality_gate(config, ws, context, split, data)

    sample_ids = publish_review_sample(config, context, judged, quality)
    decision = record_review(config, context, quality, await_review(config, sample_ids))
    common = dict(round=context.number, name=context.name, config_hash=context.config_hash,
                  parent_version=context.champion.version, run_id=context.run_id, prompts=split,
                  generations=generations, judged=judged, quality=quality, review=decision)
    if not decision.approved:
        record = RoundRecord(status="rejected", dataset=None, trained=None, evaluation=None, registration=None,
                             promotion=None, **common)
        close_round(ws, context, record)
        get_run_logger().warning(f"{context.name} rejected by {decision.reviewer}: nothing trained")
        return record

    dataset = version_dataset(config, ws, context, split)
    trained = train(config, ws, context, quality, dataset)
    evaluation = evaluate(config, ws, context, split, trained)
    registration = register(config, ws, context, quality, dataset, trained, evaluation, decision)
    promotion = promote(config, ws, registration, evaluation, decision)

    record = RoundRecord(status="completed", dataset=dataset, trained=trained, evaluation=evaluation,
                         registration=registration, promotion=promotion, **common)
    close_round(ws, context, record)
    return record
