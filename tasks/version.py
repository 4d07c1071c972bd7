from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.versioning import DatasetVersion
from flywheel.workspace import Workspace


@task(name="version-dataset", retries=2, retry_delay_seconds=5)
def version_dataset(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext,
                    split: stages.PromptSplit) -> DatasetVersion:
    stages.write_dataset_manifest(config, context, split)
    return stages.version_round_dataset(workspace, context)
