from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig


@task(name="judge")
def judge(config: FlywheelConfig, context: stages.RoundContext, split: stages.PromptSplit,
          generations: stages.Generations) -> stages.JudgedSamples:
    return stages.judge_samples(config, context, split, generations)
