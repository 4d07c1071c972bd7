from prefect import get_run_logger, task

from flywheel import registry, stages, storage
from flywheel.config import FlywheelConfig
from flywheel.preflight import size_text
from flywheel.evaluation import Evaluation
from flywheel.review import ReviewDecision
from flywheel.training import TrainedModel
from flywheel.versioning import DatasetVersion
from flywheel.workspace import Workspace


@task(name="register", retries=2, retry_delay_seconds=5)
def register(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext,
             quality: stages.QualityResult, dataset: DatasetVersion, trained: TrainedModel,
             evaluation: Evaluation, decision: ReviewDecision) -> stages.Registration:
    return stages.register_candidate(config, workspace, context, quality, dataset, trained, evaluation, decision)


@task(name="promote")
def promote(config: FlywheelConfig, workspace: Workspace, registration: stages.Registration,
            evaluation: Evaluation, decision: ReviewDecision) -> registry.Promotion:
    return stages.decide_promotion(config, workspace, registration, evaluation, decision)


@task(name="close-round", retries=2, retry_delay_seconds=5)
def close_round(workspace: Workspace, context: stages.RoundContext, record: stages.RoundRecord) -> str:
    return str(stages.close_round(workspace, context, record))


@task(name="prune-storage")
def prune_storage(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext) -> storage.PruneResult:
    """The copies (and, with 'refused', the refused candidates' weights) ``storage.prune_after_round`` asks to go.
    Runs inside the round's lock, after its record is written."""
    result = storage.prune_holding_lock(workspace, config.model.registered_name,
                                        refused=config.storage.prune_after_round == "refused",
                                        keep_refused=config.storage.keep_refused, actor=f"flywheel:{context.name}")
    get_run_logger().info(f"storage.prune_after_round={config.storage.prune_after_round}: freed "
                          f"{size_text(result.freed_bytes)} ({len(result.removed)} of {len(result.plan.items)} items)")
    return result
