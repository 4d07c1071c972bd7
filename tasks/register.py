from prefect import task

from flywheel import registry, stages
from flywheel.config import FlywheelConfig
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
