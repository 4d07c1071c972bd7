from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig


@task(name="build-data")
def build_data(config: FlywheelConfig, context: stages.RoundContext, judged: stages.JudgedSamples) -> stages.RoundData:
    return stages.build_round_data(config, context, judged)
