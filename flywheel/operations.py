"""Work that runs outside a round: score one registered version on the held-out prompts, move ``champion`` by
hand, and the links a run page shows. Plain functions; ``flows/evaluate.py`` and ``flows/promote.py`` wrap them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flywheel import registry
from flywheel.config import FlywheelConfig
from flywheel.evaluation import ModelScores
from flywheel.workspace import Workspace


class VersionEvaluation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    ref: str
    version: str
    scores: ModelScores
    perplexity: float
    prompts_path: str
    results_path: str


def held_out_prompts(config: FlywheelConfig, workspace: Workspace) -> Path:
    """The held-out prompts every round evaluates on (same split, same limit), written once per recipe."""
    from flywheel.config import resolve
    from flywheel.prompts import default_prompts, load_prompts, save_prompts, split_prompts

    if config.prompts.source == "builtin":
        prompts = default_prompts(seed=config.prompts.seed)
    else:
        prompts = load_prompts(resolve(config.prompts.source, workspace.root))
    _, held_out = split_prompts(prompts, config.prompts.eval_fraction, seed=config.prompts.seed)
    held_out = held_out[: config.prompts.eval_limit]
    key = hashlib.sha256("\n".join(p.id for p in held_out).encode()).hexdigest()[:12]
    path = workspace.state / "evals" / f"held-out-{key}.jsonl"
    if not path.is_file():
        save_prompts(held_out, path)
    return path


def evaluate_version(config: FlywheelConfig, workspace: Workspace, ref: str = registry.CHAMPION,
                     progress=None) -> VersionEvaluation:
    """Score a registered version (number or alias) greedily on the held-out prompts, as a round scores its models."""
    from flywheel.dataset import write_parquet
    from flywheel.evaluation import summarize
    from flywheel.models import resolve_device
    from flywheel.probe import perplexity
    from flywheel.stages import PromptSplit, _greedy_eval

    name = config.model.registered_name
    info = registry.get_version(workspace.tracking_uri, name, ref)
    model_dir = registry.materialize(workspace.tracking_uri, info, workspace.models)
    prompts_path = held_out_prompts(config, workspace)
    count = sum(1 for line in prompts_path.read_text().splitlines() if line.strip())
    split = PromptSplit(train_path=str(prompts_path), eval_path=str(prompts_path), train=0, eval=count,
                        round_prompts=0)
    judged = _greedy_eval(config, model_dir, split, progress)
    results = workspace.state / "evals" / f"{name}-v{info.version}-{prompts_path.stem}.standalone.parquet"
    write_parquet(judged, results)
    return VersionEvaluation(name=name, ref=ref, version=info.version, scores=summarize(judged),
                             perplexity=perplexity(model_dir, device=resolve_device(config.generation.device)),
                             prompts_path=str(prompts_path), results_path=str(results))


def promote(config: FlywheelConfig, workspace: Workspace, ref: str, *, reason: str, actor: str) -> registry.Promotion:
    return registry.set_champion(workspace.tracking_uri, config.model.registered_name, ref, reason=reason, actor=actor,
                                 store=workspace.models)


def rollback(config: FlywheelConfig, workspace: Workspace, *, reason: str, actor: str) -> registry.Promotion:
    return registry.rollback(workspace.tracking_uri, config.model.registered_name, reason=reason, actor=actor,
                             store=workspace.models)


def mlflow_version_url(tracking_uri: str, name: str, version: str) -> str | None:
    """A browser link to a model version when MLflow is a server; None for a local database."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"


def round_slot_name(config: FlywheelConfig) -> str:
    """The Prefect global concurrency limit that lets one round at a time train from this model's champion."""
    return f"flywheel-round-{config.model.registered_name}"
