"""Routed stages: generation, training or evaluation as a flow run of its own, on the work pool that
``deployment.stage_pools`` names (a GPU pool for training, say).

The round calls the stage's deployment (``flywheel-stage-<stage>/<recipe>``) with ``run_deployment`` and waits. The
stage's flow run re-opens the round's journal in the shared workspace, reads its inputs from it, and runs the stage
through the same ``journal.run`` the round would use; the round then reads the output back from the journal. The
journal is the result channel, so the workspace must be on a volume every pool's workers see, at the same path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger

from flywheel.config import FlywheelConfig, RoutableStage
from flywheel.evaluation import Evaluation
from flywheel.journal import StageJournal
from flywheel.stages import Generations, PromptSplit, QualityResult, RoundContext
from flywheel.training import TrainedModel
from flywheel.versioning import DatasetVersion
from flywheel.workspace import Workspace

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from pydantic import BaseModel

STAGE_FLOWS = {"generate": "flywheel-stage-generate", "train": "flywheel-stage-train",
               "evaluate": "flywheel-stage-evaluate"}
OUTPUTS = {"generate": Generations, "train": TrainedModel, "evaluate": Evaluation}


class StageRunFailed(RuntimeError):
    """A routed stage's flow run ended without completing: the message carries its final state's."""


def round_journal(context: RoundContext) -> StageJournal:
    return StageJournal(Path(context.work_dir) / "journal", context.name, context.config_hash)


def stage_deployment(config: FlywheelConfig, stage: RoutableStage) -> str:
    return f"{STAGE_FLOWS[stage]}/{config.name}"


def run_routed_stage(stage: RoutableStage, config: FlywheelConfig, workspace: str, context: RoundContext) -> BaseModel:
    """Run one stage of the round, in this flow run, with its inputs from the round's journal."""
    from tasks.evaluate import evaluate
    from tasks.generate import generate
    from tasks.train import train

    ws = Workspace.from_config(config, workspace)
    journal = round_journal(context)
    journal.seek(stage)
    if stage == "generate":
        args = (generate, config, context, journal.recorded("prompts", PromptSplit))
    elif stage == "train":
        args = (train, config, ws, context, journal.recorded("quality", QualityResult),
                journal.recorded("version", DatasetVersion))
    else:
        args = (evaluate, config, ws, context, journal.recorded("prompts", PromptSplit),
                journal.recorded("train", TrainedModel))
    return journal.run(stage, OUTPUTS[stage], *args, on_resume=get_run_logger().info)


def dispatch_stage(stage: RoutableStage, config: FlywheelConfig, ws: Workspace, context: RoundContext,
                   journal: StageJournal) -> BaseModel:
    """From the round: run the stage's deployment on its pool, wait for it, and return what it journaled."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from flows.deployments import run_tags

    name, pool = stage_deployment(config, stage), config.deployment.stage_pools[stage]
    logger = get_run_logger()
    logger.info(f"{context.name}: running {stage} as deployment {name!r} on work pool {pool!r}")
    try:
        child = run_deployment(
            name, parameters={"config": config.model_dump(mode="json"), "workspace": str(ws.root),
                              "context": context.model_dump(mode="json")},
            flow_run_name=f"{context.name}-{stage}", tags=run_tags(config), timeout=None)
    except ObjectNotFound:
        raise StageRunFailed(f"{context.name}: deployment.stage_pools sends {stage} to work pool {pool!r}, but "
                             f"deployment {name!r} is not registered: run `flywheel deploy` with this recipe") from None
    check_stage_run(stage, child)
    return journal.recorded(stage, OUTPUTS[stage])


def check_stage_run(stage: str, child: FlowRun) -> None:
    """Fail the round loudly when the stage's flow run did not complete (failed, crashed, cancelled)."""
    state = child.state
    if state is None or not state.is_completed():
        what = state.name if state is not None else "without a state"
        message = (state.message or "no message") if state is not None else "no message"
        raise StageRunFailed(f"{stage} flow run {child.name!r} ended {what}: {message}")


@flow(name=STAGE_FLOWS["generate"])
def generate_stage(config: FlywheelConfig, workspace: str, context: RoundContext) -> Generations:
    """The round's generation stage on its own work pool (deployment.stage_pools)."""
    return run_routed_stage("generate", config, workspace, context)


@flow(name=STAGE_FLOWS["train"])
def train_stage(config: FlywheelConfig, workspace: str, context: RoundContext) -> TrainedModel:
    """The round's training stage on its own work pool (deployment.stage_pools)."""
    return run_routed_stage("train", config, workspace, context)


@flow(name=STAGE_FLOWS["evaluate"])
def evaluate_stage(config: FlywheelConfig, workspace: str, context: RoundContext) -> Evaluation:
    """The round's evaluation stage on its own work pool (deployment.stage_pools)."""
    return run_routed_stage("evaluate", config, workspace, context)


STAGE_FLOW_OBJECTS = {"generate": generate_stage, "train": train_stage, "evaluate": evaluate_stage}
