from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.workspace import Workspace
from tasks.progress import progress_bar


@task(name="build-data")
def build_data(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext, split: stages.PromptSplit,
               judged: stages.JudgedSamples) -> stages.RoundData:
    """The recipe's strategy makes the round's training data. Refinement, SAMI and distillation generate again; how
    much is known only as they go (a tree search stops early), so the bar counts generations without a total."""
    refiner = stages.resolve_refiner(config, workspace, context)  # SPaR's trained refiner, if the recipe has one
    with progress_bar(None, f"{context.name} {config.strategy.name}", unit="generation") as advance:
        data = stages.build_round_data(config, context, judged, split, base_dir=workspace.root,
                                       models_dir=workspace.models, progress=advance, refiner=refiner)
    stages.log_metrics(workspace, context.run_id, {f"strategy.{key}": value for key, value in data.stats.items()})
    return data
