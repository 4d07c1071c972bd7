from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.workspace import Workspace


@task(name="judge")
def judge(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext, split: stages.PromptSplit,
          generations: stages.Generations) -> stages.JudgedSamples:
    reward_model = stages.prepare_reward_model(config, workspace, context)
    # A relative teacher folder in a recipe means relative to the workspace, as every other path does.
    return stages.judge_samples(config, context, split, generations, base_dir=workspace.root,
                                reward_model_dir=reward_model)
