from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.workspace import Workspace
from tasks.progress import progress_bar


@task(name="load-prompts")
def load_prompts(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext) -> stages.PromptSplit:
    return stages.load_prompt_split(config, workspace, context)


@task(name="generate")
def generate(config: FlywheelConfig, context: stages.RoundContext, split: stages.PromptSplit) -> stages.Generations:
    total = split.round_prompts * config.generation.samples_per_prompt
    with progress_bar(total, f"{context.name} generate") as advance:
        return stages.generate_samples(config, context, split, advance)
