from prefect import get_run_logger, task

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.training import TrainedModel
from flywheel.versioning import DatasetVersion
from flywheel.workspace import Workspace


@task(name="train")
def train(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext,
          quality: stages.QualityResult, dataset: DatasetVersion) -> TrainedModel:
    trained = stages.train_models(config, workspace, context, quality, dataset)
    if trained.refiner is not None:
        get_run_logger().info(f"{context.name} refiner {trained.refiner.name}: {trained.refiner.reason}")
    return trained
