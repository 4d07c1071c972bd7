"""One flywheel round: generate -> judge -> build data -> quality gate -> review gate -> version -> train ->
evaluate -> register -> promote, with the round's manifest written last."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.stages import dispatch_stage, round_journal
from flywheel.config import FlywheelConfig
from flywheel.evaluation import Evaluation
from flywheel.journal import set_aside
from flywheel.registry import Promotion
from flywheel.review import ReviewDecision
from flywheel.stages import (
    Generations,
    JudgedSamples,
    PromptSplit,
    QualityResult,
    Registration,
    RoundContext,
    RoundData,
    RoundRecord,
    fail_round,
)
from flywheel.training import TrainedModel
from flywheel.versioning import DatasetVersion
from flywheel.workspace import Workspace, round_lock
from tasks.build import build_data
from tasks.evaluate import evaluate
from tasks.feedback import judge
from tasks.generate import generate, load_prompts
from tasks.quality import quality_gate
from tasks.register import close_round, promote, prune_storage, register
from tasks.review import await_review, publish_review_sample, record_review
from tasks.setup import open_round, prepare_workspace, resolve_champion
from tasks.train import train
from tasks.version import version_dataset


@flow(name="flywheel-round")
def flywheel_round(config: FlywheelConfig = FlywheelConfig(), workspace: str | None = None, wait: bool = False,
                   restart: bool = False) -> RoundRecord:
    """One round. A re-run of an unfinished round resumes after its last finished stage (``restart``: anew)."""
    ws = prepare_workspace(config, Workspace.from_config(config, workspace))
    with round_lock(ws, wait=wait):
        champion = resolve_champion(config, ws)
        context = open_round(config, ws, champion)
        try:
            record = run_stages(config, ws, context, restart)
        except BaseException as error:
            # The round's MLflow run says why it failed; a re-run resumes the round after its last finished stage.
            fail_round(ws, context, error)
            raise
        if config.storage.prune_after_round != "off":
            prune_storage(config, ws, context)  # the record is written: the round needs none of its copies now
        return record


def run_stages(config: FlywheelConfig, ws: Workspace, context: RoundContext, restart: bool = False) -> RoundRecord:
    if restart:
        set_aside(Path(context.work_dir) / "journal")  # before opening it: a set-aside journal's header is not checked
    journal = round_journal(context)
    logger = get_run_logger()
    routed = config.deployment.stage_pools

    def stage(name, kind, task, *args):
        if name in routed:
            # Its own flow run on its work pool; it journals the output, which dispatch_stage reads back.
            task, args = dispatch_stage, (name, config, ws, context, journal)
        return journal.run(name, kind, task, *args, on_resume=logger.info)

    split = stage("prompts", PromptSplit, load_prompts, config, ws, context)
    generations = stage("generate", Generations, generate, config, context, split)
    judged = stage("judge", JudgedSamples, judge, config, ws, context, split, generations)
    data = stage("build", RoundData, build_data, config, ws, context, split, judged)
    quality = stage("quality", QualityResult, quality_gate, config, ws, context, split, data)
    decision = stage("review", ReviewDecision, review_round, config, ws, context, judged, quality)

    common = dict(round=context.number, name=context.name, config_hash=context.config_hash,
                  parent_version=context.champion.version, run_id=context.run_id, prompts=split,
                  generations=generations, judged=judged, quality=quality, review=decision)
    if not decision.approved:
        record = RoundRecord(status="rejected", dataset=None, trained=None, evaluation=None, registration=None,
                             promotion=None, **common)
        close_round(ws, context, record)
        logger.warning(f"{context.name} rejected by {decision.reviewer}: nothing trained")
        return record

    dataset = stage("version", DatasetVersion, version_dataset, config, ws, context, split)
    trained = stage("train", TrainedModel, train, config, ws, context, quality, dataset)
    evaluation = stage("evaluate", Evaluation, evaluate, config, ws, context, split, trained)
    registration = stage("register", Registration, register, config, ws, context, quality, dataset, trained,
                         evaluation, decision)
    promotion = stage("promote", Promotion, promote, config, ws, registration, evaluation, decision)

    record = RoundRecord(status="completed", dataset=dataset, trained=trained, evaluation=evaluation,
                         registration=registration, promotion=promotion, **common)
    close_round(ws, context, record)
    return record


def review_round(config: FlywheelConfig, ws: Workspace, context: RoundContext, judged: JudgedSamples,
                 quality: QualityResult) -> ReviewDecision:
    """Publish the sample, wait for the decision (pausing is a flow-run operation), record it."""
    sample_ids = publish_review_sample(config, context, judged, quality)
    return record_review(config, ws, context, quality, judged, await_review(config, quality, sample_ids))
