from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.training import TrainedModel
from flywheel.versioning import DatasetVersion
from flywheel.workspace import Workspace


@task(name="train")
def train(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext,
          quality: stages.QualityResult, dataset: DatasetVersion) -> TrainedModel:
    return stages.train_candidate(config, workspace, context, quality, dataset)
