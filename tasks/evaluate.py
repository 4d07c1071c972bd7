from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.evaluation import Evaluation
from flywheel.training import TrainedModel
from flywheel.workspace import Workspace
from tasks.progress import progress_bar


@task(name="evaluate")
def evaluate(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext,
             split: stages.PromptSplit, trained: TrainedModel) -> Evaluation:
    with progress_bar(split.eval * 2, f"{context.name} evaluate") as advance:
        return stages.evaluate_candidate(config, workspace, context, split, trained, advance)
