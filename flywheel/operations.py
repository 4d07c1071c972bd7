"""Work that runs outside a round: score one registered version on the held-out prompts, move ``champion`` by
hand, and the links a run page shows. Plain functions; ``flows/evaluate.py`` and ``flows/promote.py`` wrap them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flywheel import registry
from flywheel.config import FlywheelConfig
from flywheel.evaluation import ModelScores
from flywheel.open_ended import OpenEndedResult
from flywheel.prompts import Prompt
from flywheel.workspace import Workspace


class VersionEvaluation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str  # the registered model, or the folder's path
    ref: str
    version: str  # "folder" for a model folder
    scores: ModelScores
    perplexity: float
    # The probe of the base a registered version descends from (None for a folder or a version without lineage).
    base_version: str | None = None
    base_perplexity: float | None = None
    prompts_path: str
    results_path: str
    against: str | None = None  # what the win rate compares with (a version, alias or folder)
    against_version: str | None = None
    win_rate: float | None = None  # share of held-out prompts where this model beats `against`; ties count half
    win_judge: str | None = None  # who decided the wins: verifier, self or teacher
    # Held-out answers that copy their instructions' wording (flywheel.evaluation.echoed_answers), as a round counts.
    echoed_answers: int = 0
    # Held-out answers that are degenerate repetitions (flywheel.evaluation.repetitive_answers), as a round counts.
    repetitive_answers: int = 0
    open_ended: OpenEndedResult | None = None  # against `against`, on open-ended prompts, by an LLM judge
    open_ended_path: str | None = None  # the answers and verdicts

    @property
    def perplexity_increase_vs_base(self) -> float | None:
        return None if self.base_perplexity is None else self.perplexity / self.base_perplexity - 1


class ResolvedModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: str
    path: str
    key: str = ""  # a registered version's identity for caches (stages.model_key); a folder has none


def resolve_model(config: FlywheelConfig, workspace: Workspace, ref: str) -> ResolvedModel:
    """A registered version (``3``, ``v3``), an alias (``champion``), or a model folder on disk."""
    from flywheel.models import ModelError

    folder = Path(ref).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder}: not a model folder (no config.json)")
        return ResolvedModel(name=str(folder.resolve()), version="folder", path=str(folder.resolve()))
    if "/" in ref or ref.startswith("."):
        raise ModelError(f"{ref}: model folder not found")
    name = config.model.registered_name
    info = registry.get_version(workspace.tracking_uri, name, ref)
    from flywheel.stages import model_key

    return ResolvedModel(name=name, version=info.version, key=model_key(name, info),
                         path=str(registry.materialize(workspace.tracking_uri, info, workspace.models)))


def held_out_prompts(config: FlywheelConfig, workspace: Workspace) -> Path:
    """The held-out prompts every round evaluates on (same split, same limit), written once per recipe."""
    from flywheel.prompts import recipe_prompts, save_prompts, split_prompts

    prompts = recipe_prompts(config.prompts, workspace.root)
    _, held_out = split_prompts(prompts, config.prompts.eval_fraction, seed=config.prompts.seed)
    held_out = held_out[: config.prompts.eval_limit]
    key = hashlib.sha256("\n".join(p.id for p in held_out).encode()).hexdigest()[:12]
    path = workspace.state / "evals" / f"held-out-{key}.jsonl"
    if not path.is_file():
        save_prompts(held_out, path)
    return path


def evaluate_version(config: FlywheelConfig, workspace: Workspace, ref: str = registry.CHAMPION,
                     progress=None, *, against: str | None = None, judge: str = "verifier",
                     open_ended: int = 0) -> VersionEvaluation:
    """Score a model (registered version, alias or folder) greedily on the held-out prompts, as a round scores its
    models: prompt- and instruction-level accuracy, strict and loose, per instruction type. With ``against``, also
    the win rate over that model's answers, decided by ``judge``: ``verifier`` (the verifier's score), or ``self``
    / ``teacher`` (the recipe's LLM judge scores both answers; ``self`` is the champion). With ``open_ended`` N
    (needs ``against`` and an LLM ``judge``), also the open-ended win rate on N prompts of
    ``evaluation.open_ended_prompts``, as rounds compute it (``stages.open_ended_comparison``)."""
    from flywheel.dataset import write_parquet
    from flywheel.evaluation import echoed_answers, repetitive_answers, summarize
    from flywheel.models import resolve_device
    from flywheel.probe import perplexity
    from flywheel.prompts import load_prompts
    from flywheel.quality import text_limits

    if open_ended and against is None:
        raise ValueError("the open-ended win rate compares two models: name the other one (--against)")
    if open_ended and judge not in ("self", "teacher"):
        raise ValueError(f"the open-ended win rate needs an LLM judge (--judge self or teacher), not {judge!r}: "
                         "the verifier has nothing to check in open-ended prompts")
    model = resolve_model(config, workspace, ref)
    prompts_path = held_out_prompts(config, workspace)
    prompts = load_prompts(prompts_path)
    judged = _score(config, workspace, model, prompts, progress)
    label = f"v{model.version}" if model.version != "folder" else hashlib.sha256(model.path.encode()).hexdigest()[:8]
    results = workspace.state / "evals" / f"{Path(model.name).name}-{label}-{prompts_path.stem}.standalone.parquet"
    write_parquet(judged, results)
    extra: dict = {
        "echoed_answers": echoed_answers(judged, prompts, config.feedback.echo_ngram),
        "repetitive_answers": repetitive_answers(judged, text_limits(config.quality)),
    }
    if against is not None:
        other = resolve_model(config, workspace, against)
        other_judged = _score(config, workspace, other, prompts, progress)
        extra |= {"against": against, "against_version": other.version, "win_judge": judge,
                  "win_rate": _win_rate(config, workspace, prompts, judged, other_judged, judge)}
        if open_ended:
            from flywheel.stages import open_ended_comparison

            rows = results.with_name(results.name.replace(".standalone.parquet", f".open-ended-vs-"
                                                          f"{other.version}.parquet"))
            extra["open_ended"] = open_ended_comparison(config, workspace.root, workspace.state, Path(model.path),
                                                        Path(other.path), limit=open_ended, judge=judge,
                                                        rows_path=rows, progress=progress)
            extra["open_ended_path"] = str(rows)
    device = resolve_device(config.generation.device)
    if model.version == "folder":  # a folder's contents may change: measured every time
        own = perplexity(Path(model.path), device=device)
    else:
        from flywheel.stages import base_probe_perplexity, probe_perplexity

        own = probe_perplexity(workspace, model.key, lambda: Path(model.path), device)
        base = base_probe_perplexity(workspace, model.name, model.version, device=device)
        if base is not None:
            extra.update(base_version=base[0], base_perplexity=base[1])
    return VersionEvaluation(name=model.name, ref=ref, version=model.version, scores=summarize(judged),
                             perplexity=own, prompts_path=str(prompts_path), results_path=str(results), **extra)


def _score(config: FlywheelConfig, workspace: Workspace, model: ResolvedModel, prompts: Sequence[Prompt],
           progress):
    from flywheel.stages import greedy_eval

    return greedy_eval(config, Path(model.path), prompts, progress, workspace.state)


def _win_rate(config: FlywheelConfig, workspace: Workspace, prompts: Sequence[Prompt], judged, other_judged,
              judge: str) -> float:
    from flywheel.evaluation import win_rate

    if judge == "verifier":
        return win_rate(dict(zip(judged["prompt_id"], judged["score"])),
                        dict(zip(other_judged["prompt_id"], other_judged["score"])))
    if judge not in ("self", "teacher"):
        raise ValueError(f"unknown judge {judge!r} (verifier, self or teacher)")
    from flywheel.config import FeedbackConfig
    from flywheel.judges import build_llm_judge
    from flywheel.models import resolve_device

    # The recipe's judge settings (votes, teacher), deciding every row.
    feedback = FeedbackConfig(**{**config.feedback.model_dump(), "judges": [judge], "llm_scope": "all"})
    champion = resolve_model(config, workspace, registry.CHAMPION)
    llm = build_llm_judge(config.model_copy(update={"feedback": feedback}), Path(champion.path), workspace.root,
                          device=resolve_device(config.generation.device))
    by_id = {p.id: p for p in prompts}
    try:
        ids = list(judged["prompt_id"])
        mine = llm.judge([(by_id[i], r) for i, r in zip(ids, judged["response"])])
        theirs_by_id = dict(zip(other_judged["prompt_id"], other_judged["response"]))
        theirs = llm.judge([(by_id[i], theirs_by_id[i]) for i in ids])
    finally:
        llm.close()
    return win_rate({i: v.score for i, v in zip(ids, mine)}, {i: v.score for i, v in zip(ids, theirs)})


class GeneratedAnswers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    version: str
    prompts: int
    answers: int
    refined: int  # answers a self-refinement round changed
    path: str


def generate_answers(config: FlywheelConfig, workspace: Workspace, ref: str, output: Path, *,
                     prompts_path: Path | None = None, samples: int = 1, refine_rounds: int = 0,
                     progress=None) -> GeneratedAnswers:
    """A model answers prompts (a prompt file, else the recipe's held-out prompts), with the recipe's sampling
    settings; with ``refine_rounds``, each answer is critiqued and rewritten by the same model that many times
    (inference-time self-refinement, ``flywheel.refine.refine_answers``). Writes JSONL, one answer per line."""
    import json

    from flywheel.generation import SamplingParams, make_engine, user_request
    from flywheel.models import atomic_write_text, resolve_device
    from flywheel.prompts import load_prompts
    from flywheel.stages import _engine_options

    model = resolve_model(config, workspace, ref)
    prompts = load_prompts(prompts_path or held_out_prompts(config, workspace))
    gen = config.generation
    engine_name = "transformers" if gen.engine == "openai" else gen.engine
    engine = make_engine(engine_name, Path(model.path), resolve_device(gen.device), gen.batch_size,
                         **_engine_options(config, workspace.state))
    params = SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature if samples > 1 else 0.0,
                            top_p=gen.top_p, seed=config.seed)
    completions = engine.generate([user_request(p.prompt) for p in prompts], samples, params, progress)
    answers = [c.text for c in completions]
    first = list(answers)
    if refine_rounds:
        from flywheel.refine import refine_answers

        answers = refine_answers([prompts[c.request_index] for c in completions], answers, engine,
                                 rounds=refine_rounds, params=params, progress=progress)
    lines = [json.dumps({"prompt_id": prompts[c.request_index].id, "prompt": prompts[c.request_index].prompt,
                         "sample_index": c.sample_index, "response": text, "first_response": before,
                         "refined": text != before, "model": model.name, "version": model.version})
             for c, text, before in zip(completions, answers, first)]
    atomic_write_text(output, "\n".join(lines) + "\n")
    return GeneratedAnswers(model=model.name, version=model.version, prompts=len(prompts), answers=len(answers),
                            refined=sum(a != b for a, b in zip(answers, first)), path=str(output))


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
