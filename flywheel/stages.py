"""One round's stages as plain functions: each takes the previous stage's typed value and the config it needs,
does its I/O under the round's folders, and returns its own typed value. ``tasks/`` wraps each one as a Prefect
task and ``flows/round.py`` composes them; nothing here imports Prefect.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from flywheel import registry
from flywheel.config import FlywheelConfig
from flywheel.dataset import DatasetManifest, atomic_path, read_table, write_json, write_parquet
from flywheel.evaluation import Evaluation
from flywheel.generation import SamplingParams
from flywheel.models import ModelError, atomic_write_text, provision_base
from flywheel.prompts import Prompt
from flywheel.quality import QualityOutcome, QualityReport, text_limits
from flywheel.review import ReviewDecision
from flywheel.training import TrainedModel
from flywheel.versioning import DatasetVersion
from flywheel.workspace import Workspace

if TYPE_CHECKING:
    import pandas as pd

Progress = Callable[[int], None]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Champion(Frozen):
    version: str
    path: str
    sha256: str


class RoundContext(Frozen):
    number: int
    name: str
    data_dir: str
    work_dir: str
    run_id: str
    config_hash: str
    champion: Champion


class PromptSplit(Frozen):
    train_path: str
    eval_path: str
    train: int
    eval: int
    round_prompts: int
    focus_round: int | None = None  # the earlier round whose samples weighted this round's prompts (prompts.focus)


class Generations(Frozen):
    path: str
    prompts: int
    samples: int
    tokens: int
    seconds: float
    tokens_per_second: float


class JudgedSamples(Frozen):
    path: str
    rows: int
    pass_rate: float  # over the rows with a verdict
    mean_score: float
    judges: list[str] = ["verifier"]
    no_verdict: int = 0  # rows left without a verdict: kept in the table, never training data
    agreement: float | None = None  # LLM judge vs verifier on rows both judged; None when no LLM judge ran
    agreement_rows: int = 0


class RoundData(Frozen):
    samples_path: str
    pairs_path: str
    sft_path: str
    samples: int
    pairs: int
    sft: int
    strategy: str = "best_of_n"
    stats: dict[str, float] = {}  # the strategy's own counts (rows refined, searches solved, ...)
    record_path: str | None = None  # strategy.json: what else the strategy made (principles, guidelines, ...)
    refiner_version: str | None = None  # SPaR with a trained refiner: the refiner version that refined the answers


class QualityResult(Frozen):
    report: QualityReport
    quarantine_path: str
    clean: RoundData
    quarantined: int


class Registration(Frozen):
    version: str
    aliases: list[str]
    run_id: str


class RoundRecord(Frozen):
    """The round's manifest: written last, so its presence means the round finished."""

    round: int
    name: str
    status: Literal["completed", "rejected"]
    config_hash: str
    parent_version: str
    run_id: str
    prompts: PromptSplit
    generations: Generations
    judged: JudgedSamples
    quality: QualityResult
    review: ReviewDecision
    dataset: DatasetVersion | None
    trained: TrainedModel | None
    evaluation: Evaluation | None
    registration: Registration | None
    promotion: registry.Promotion | None


# --- workspace and champion -------------------------------------------------------------------------------------

def prepare_workspace(config: FlywheelConfig, workspace: Workspace) -> Workspace:
    from flywheel.preflight import preflight
    from flywheel.versioning import ensure_repository

    preflight(config, workspace)  # bad input or unusable storage fails here, before anything is written
    ensure_repository(workspace.root, workspace.dvc_remote)
    for folder in (workspace.models, workspace.records, workspace.rounds_data):
        folder.mkdir(parents=True, exist_ok=True)
    return workspace


def resolve_champion(config: FlywheelConfig, workspace: Workspace) -> Champion:
    """The model the round starts from: whatever ``champion`` points at; on first use the base becomes version 1."""
    name = config.model.registered_name
    uri = workspace.tracking_uri
    current = registry.find_version(uri, name, registry.CHAMPION)
    if current is None:
        current = _interrupted_base_registration(uri, name)
        if current is not None:
            registry.client(uri).set_registered_model_alias(name, registry.CHAMPION, current.version)
    if current is None:
        if registry.list_versions(uri, name):
            raise ModelError(f"registered model {name!r} has versions but no {registry.CHAMPION!r} alias: "
                             f"set one with `flywheel promote VERSION`")
        base = provision_base(config.model.base, workspace.models, base_dir=workspace.root)
        experiment = registry.experiment_id(uri, f"flywheel/{name}", workspace.mlflow_artifacts)
        mlflow_client = registry.client(uri)
        run = mlflow_client.create_run(experiment, run_name="base-model", tags={f"{registry.TAG}kind": "base"})
        tags = {
            f"{registry.TAG}round": "0",
            f"{registry.TAG}model_sha256": base.sha256,
            f"{registry.TAG}source": base.source,
        }
        current = registry.register_model_dir(
            uri, name, Path(base.path), run.info.run_id, tags=tags, aliases=(registry.CHAMPION,),
            description=f"Base policy {base.source} (sha256 {base.sha256[:12]}), registered on first use.",
        )
        mlflow_client.set_terminated(run.info.run_id)
    path = registry.materialize(uri, current, workspace.models)
    return Champion(version=current.version, path=str(path), sha256=current.tags.get(f"{registry.TAG}model_sha256", ""))


def _interrupted_base_registration(uri: str, name: str) -> registry.VersionInfo | None:
    """A base version registered by a first round that died before setting ``champion`` on it."""
    versions = registry.list_versions(uri, name)
    if len(versions) == 1 and versions[0].tags.get(f"{registry.TAG}round") == "0":
        return versions[0]
    return None


def next_round_number(workspace: Workspace) -> int:
    """One past the last finished round: an unfinished round is resumed under its own number."""
    prefix = workspace.tag_prefix
    finished = [int(p.stem[len(prefix):]) for p in workspace.records.glob(f"{prefix}*.json")
                if p.stem[len(prefix):].isdigit()]
    return max(finished, default=0) + 1


def open_round(config: FlywheelConfig, workspace: Workspace, champion: Champion, number: int) -> RoundContext:
    """Create the round's folders and its MLflow run (reused when resuming the same round)."""
    name = workspace.round_name(number)
    uri = workspace.tracking_uri
    experiment = registry.experiment_id(uri, f"flywheel/{config.model.registered_name}", workspace.mlflow_artifacts)
    mlflow_client = registry.client(uri)
    # A resumed round keeps its run (and the metrics its finished stages logged); a failed attempt's run reopens.
    existing = [run for run in mlflow_client.search_runs(
        [experiment], filter_string=f"tags.`{registry.TAG}round` = '{number}'", order_by=["attributes.start_time DESC"]
    ) if run.info.status != "FINISHED"]
    if existing:
        run_id = existing[0].info.run_id
        if existing[0].info.status != "RUNNING":
            mlflow_client.update_run(run_id, status="RUNNING")
    else:
        run = mlflow_client.create_run(experiment, run_name=name, tags={
            f"{registry.TAG}round": str(number),
            f"{registry.TAG}config_hash": config.config_hash(),
            f"{registry.TAG}parent_version": champion.version,
            f"{registry.TAG}recipe": config.name,
        })
        run_id = run.info.run_id
        _log_params(mlflow_client, run_id, config)
    # The round's data folder (DVC-tracked) is only written once the quality gate passes (see quality_gate): a round
    # that fails earlier leaves the data store as it was. Work in progress lives in the round's state folder.
    data_dir, work_dir = workspace.round_data(number), workspace.round_state(number)
    work_dir.mkdir(parents=True, exist_ok=True)
    return RoundContext(number=number, name=name, data_dir=str(data_dir), work_dir=str(work_dir), run_id=run_id,
                        config_hash=config.config_hash(), champion=champion)


def _log_params(mlflow_client, run_id: str, config: FlywheelConfig) -> None:
    from mlflow.entities import Param

    flat: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", config.model_dump(mode="json"))
    mlflow_client.log_batch(run_id, params=[Param(k, v[:500]) for k, v in sorted(flat.items())])


def log_metrics(workspace: Workspace, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    registry.client(workspace.tracking_uri).log_batch(run_id, metrics=items)


# --- prompts, generation, feedback, data ------------------------------------------------------------------------

def load_prompt_split(config: FlywheelConfig, workspace: Workspace, context: RoundContext) -> PromptSplit:
    from flywheel.prompts import recipe_prompts, sample_round_prompts, save_prompts, split_prompts

    prompts = recipe_prompts(config.prompts, workspace.root)
    train, held_out = split_prompts(prompts, config.prompts.eval_fraction, seed=config.prompts.seed)
    earlier = [r.round for r in read_round_records(workspace) if r.round < context.number] \
        if config.prompts.focus else []
    if earlier:
        from flywheel.focus import focused_round_prompts

        scores = focus_scores(workspace, max(earlier), training_table(config))
        answered = {p.id for number in earlier for p in _round_prompts(workspace, number)}
        chosen = focused_round_prompts(train, config.prompts.per_round, context.number, scores,
                                       config.prompts.focus, answered, seed=config.prompts.seed)
        log_metrics(workspace, context.run_id, {f"prompts.focus.{kind}": v for kind, v in scores.items()})
    else:  # unfocused, or nothing to focus on yet: the first round draws what an unfocused recipe draws
        chosen = sample_round_prompts(train, config.prompts.per_round, context.number, seed=config.prompts.seed)
    held_out = held_out[: config.prompts.eval_limit]
    work_dir = Path(context.work_dir)
    save_prompts(chosen, work_dir / "prompts.jsonl")
    save_prompts(held_out, work_dir / "eval_prompts.jsonl")
    return PromptSplit(train_path=str(work_dir / "prompts.jsonl"), eval_path=str(work_dir / "eval_prompts.jsonl"),
                       train=len(train), eval=len(held_out), round_prompts=len(chosen),
                       focus_round=max(earlier) if earlier else None)


def focus_scores(workspace: Workspace, number: int, table: str) -> dict[str, float]:
    """``flywheel.focus.teachable_failure`` of round ``number``'s clean samples and ``table`` rows (its dataset)."""
    from flywheel.focus import teachable_failure

    data = workspace.round_data(number)
    frames = {}
    # GRPO trains on the samples table itself: read it once.
    for name, columns in {table: ["prompt_id"], "samples": ["prompt_id", "checks"]}.items():
        path = data / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"prompts.focus reads round {number}'s {path.name}, which is missing ({path}); "
                                    "restore it (dvc checkout at its tag) or set prompts.focus: 0")
        frames[name] = read_table(path)
        missing = sorted(set(columns) - set(frames[name].columns))
        if missing:
            raise ValueError(f"prompts.focus: round {number}'s {path.name} lacks columns {missing}; "
                             "set prompts.focus: 0")
    checks = [(row.prompt_id, json.loads(row.checks)) for row in frames["samples"].itertuples()]
    return teachable_failure(checks, set(frames[table].prompt_id))


def _round_prompts(workspace: Workspace, number: int) -> list:
    from flywheel.prompts import load_prompts

    path = workspace.round_data(number) / "prompts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"prompts.focus skips the prompts earlier rounds answered, but round {number}'s "
                                f"{path.name} is missing ({path}); restore it or set prompts.focus: 0")
    return load_prompts(path)


# Prompts answered per part file (at least one engine batch of them, see _chunk_prompts): generation holds one
# chunk's completions in memory, and a crash loses at most one chunk's work. Part of each part's key, so changing it
# regenerates rather than mixes chunkings.
GENERATION_CHUNK_PROMPTS = 64
_PART_KEY = b"flywheel.part_key"
_PART_SECONDS = b"flywheel.generate_seconds"


def generate_samples(config: FlywheelConfig, context: RoundContext, split: PromptSplit,
                     progress: Progress | None = None) -> Generations:
    """Every training prompt answered ``samples_per_prompt`` times, streamed in chunks of
    ``GENERATION_CHUNK_PROMPTS`` (or a batch of) prompts: each chunk goes to its own part file (atomically) under
    ``<work_dir>/generations/``, so memory holds one chunk and a re-run after a crash keeps the finished chunks. The
    parts are then concatenated, in prompt order, into ``generations.parquet``."""
    from flywheel.faults import fault_point
    from flywheel.generation import EngineError, close_engine, make_engine, user_request
    from flywheel.models import resolve_device
    from flywheel.prompts import load_prompts

    prompts = load_prompts(Path(split.train_path))
    gen = config.generation
    parts_dir = Path(context.work_dir) / "generations"
    chunks = _generation_chunks(config, context, prompts)
    engine = None

    def advance(done: int) -> None:
        if progress:
            progress(done)
        fault_point("during:generate")

    try:
        for chunk in chunks:
            path = parts_dir / f"part-{chunk.index:05d}.parquet"
            if _part_is_complete(path, chunk):
                if progress:
                    progress(chunk.rows)  # the progress bar counts every sample, reused ones too
                continue
            if engine is None:  # loaded only when a chunk is missing: a complete stage re-run never loads the model
                engine = make_engine(gen.engine, Path(context.champion.path), resolve_device(gen.device),
                                     gen.batch_size, endpoint=gen.openai,
                                     **_engine_options(config, _state_dir(context)))
            started = time.perf_counter()
            completions = engine.generate([user_request(p.prompt) for p in prompts[chunk.start:chunk.stop]],
                                          gen.samples_per_prompt, chunk.params, advance)
            seconds = time.perf_counter() - started
            if len(completions) != chunk.rows:
                raise EngineError(f"generation engine {gen.engine!r} returned {len(completions)} completions for "
                                  f"{chunk.stop - chunk.start} prompts x {gen.samples_per_prompt} samples "
                                  f"(expected {chunk.rows})")
            _write_part(completions, chunk, seconds, path)
            del completions
    finally:
        if engine is not None:
            close_engine(engine)
    path = Path(context.work_dir) / "generations.parquet"
    tokens, samples, seconds = _assemble_parts([parts_dir / f"part-{c.index:05d}.parquet" for c in chunks], path)
    return Generations(path=str(path), prompts=len(prompts), samples=samples, tokens=tokens,
                       seconds=seconds, tokens_per_second=tokens / max(seconds, 1e-9))


class _Chunk(Frozen):
    index: int
    start: int  # offset of the chunk's first prompt in the round's prompt list
    stop: int
    rows: int  # completions the chunk must hold: its prompts x samples_per_prompt
    params: SamplingParams
    key: str  # what the chunk's samples depend on; a part file with another key is stale


def _generation_chunks(config: FlywheelConfig, context: RoundContext, prompts: list) -> list[_Chunk]:
    import hashlib

    gen = config.generation
    size = _chunk_prompts(config)
    round_seed = config.seed * 10_000 + context.number
    # Everything that changes a chunk's samples besides its seed: a part made under another generation setup, model
    # or prompt list (a round restarted with --restart after a recipe change, say) is never reused.
    setup = json.dumps({"generation": gen.model_dump(mode="json"), "model": [context.champion.version,
                        context.champion.sha256, context.champion.path], "chunk_prompts": size},
                       sort_keys=True)
    chunks = []
    for index, start in enumerate(range(0, len(prompts), size)):
        stop = min(start + size, len(prompts))
        # One seed per chunk, derived from the round's seed and the chunk's index only: a resumed round draws the
        # same samples as an uninterrupted one. The first chunk keeps the round's seed, so a round of one chunk
        # draws what it drew before generation was chunked; later ones hash it (below 2**31: engines scale seeds).
        digest = hashlib.sha256(f"generate\x00{round_seed}\x00{index}".encode()).digest()
        params = SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                seed=round_seed if index == 0 else int.from_bytes(digest[:4], "big") >> 1)
        body = json.dumps([p.model_dump(mode="json") for p in prompts[start:stop]], sort_keys=True)
        key = hashlib.sha256("\x00".join([setup, params.model_dump_json(), body]).encode()).hexdigest()
        chunks.append(_Chunk(index=index, start=start, stop=stop, rows=(stop - start) * gen.samples_per_prompt,
                             params=params, key=key))
    return chunks


def _chunk_prompts(config: FlywheelConfig) -> int:
    """Prompts per chunk: never fewer than the engine works on at once (its batch; an endpoint's requests in flight),
    so chunking never starves a large batch or a GPU engine."""
    gen = config.generation
    return max(GENERATION_CHUNK_PROMPTS, gen.batch_size, gen.openai.max_concurrency if gen.openai else 0)


def _part_is_complete(path: Path, chunk: _Chunk) -> bool:
    """A part file written for this very chunk, with every row: anything else is regenerated."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)  # the footer only: no rows are read
    except (OSError, pa.ArrowException):
        return False
    recorded = (meta.metadata or {}).get(_PART_KEY)
    return recorded == chunk.key.encode() and meta.num_rows == chunk.rows


def _write_part(completions: list, chunk: _Chunk, seconds: float, path: Path) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = pd.DataFrame([c.model_dump() for c in completions])
    frame["request_index"] += chunk.start  # the engine numbers the chunk's prompts; the table numbers the round's
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _PART_KEY: chunk.key.encode(),
                                           _PART_SECONDS: repr(seconds).encode()})
    with atomic_path(path) as tmp:  # pyarrow directly: the schema metadata must survive the write
        pq.write_table(table, tmp)


def _assemble_parts(parts: list[Path], path: Path) -> tuple[int, int, float]:
    """Concatenate the parts, in order, into ``path`` one part at a time (atomically); returns (tokens, rows,
    generation seconds summed over the parts, whichever attempt made them)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not parts:
        raise ValueError(f"{path}: no generation parts to assemble (the round has no prompts)")
    tokens = rows = 0
    seconds = 0.0
    with atomic_path(path) as tmp:
        writer = None
        try:
            for part in parts:
                table = pq.read_table(part)
                metadata = dict(table.schema.metadata or {})
                seconds += float(metadata.pop(_PART_SECONDS, b"0"))
                metadata.pop(_PART_KEY, None)  # per-part bookkeeping, not the table's
                table = table.replace_schema_metadata(metadata)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
                tokens += int(pc.sum(table["n_tokens"]).as_py() or 0)
                rows += table.num_rows
                del table
        finally:
            if writer is not None:
                writer.close()
    return tokens, rows, seconds


def needs_reward_model(config: FlywheelConfig) -> bool:
    return "reward_model" in config.feedback.judges or (
        config.training.method == "grpo" and "reward_model" in config.strategy.grpo.rewards)


def accumulated_pairs(workspace: Workspace, before: int) -> list[dict]:
    """The clean preference pairs of every finished round before ``before``, for the reward model. Pairs of a
    round a human reviewer approved count twice (weight 2): their data was seen by a person."""
    rows: list[dict] = []
    for number in range(1, before):
        folder = workspace.round_data(number)
        pairs, review = folder / "pairs.parquet", folder / "review.json"
        if not pairs.is_file():
            continue
        human = review.is_file() and json.loads(review.read_text(encoding="utf-8")).get("mode") == "human"
        weight = 2 if human else 1
        rows += [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "weight": weight}
                 for r in read_table(pairs).to_dict(orient="records")]
    return rows


def prepare_reward_model(config: FlywheelConfig, workspace: Workspace, context: RoundContext) -> Path | None:
    """Train the round's reward model on the earlier rounds' pairs (once: a resumed round reuses it)."""
    if not needs_reward_model(config):
        return None
    from flywheel.reward import RewardModelError, train_reward_model

    target = Path(context.work_dir) / REWARD_MODEL_DIR
    if (target / "config.json").is_file():  # written atomically: present means complete
        return target
    pairs = accumulated_pairs(workspace, context.number)
    if not pairs:
        raise RewardModelError("reward_model: no preference pairs from earlier rounds to train it on; run a "
                               "round with another judge first (e.g. judges: [verifier])")
    info = train_reward_model(Path(context.champion.path), pairs, target, config.training, seed=config.seed)
    log_metrics(workspace, context.run_id, {"reward_model.rows": info.rows, "reward_model.accuracy": info.accuracy,
                                            "reward_model.train_loss": info.train_loss})
    return target


def judge_samples(config: FlywheelConfig, context: RoundContext, split: PromptSplit,
                  generations: Generations, base_dir: Path | None = None,
                  reward_model_dir: Path | None = None) -> JudgedSamples:
    """The recipe's judges score every sample (see ``flywheel.feedback.judge_table``). A judge that leaves more
    rows without a verdict than ``quality.max_failed_fraction`` stops the round before anything is written.
    ``base_dir``: where a relative local teacher folder is found (the workspace root; default: the current one)."""
    from flywheel.feedback import check_verdicts, judge_table
    from flywheel.generation import Completion
    from flywheel.judges import build_llm_judge
    from flywheel.models import resolve_device
    from flywheel.prompts import load_prompts

    prompts = load_prompts(Path(split.train_path))
    completions = [Completion(**row) for row in read_table(Path(generations.path)).to_dict(orient="records")]
    feedback = config.feedback
    llm = build_llm_judge(config, Path(context.champion.path), base_dir or Path.cwd(),
                          device=resolve_device(config.generation.device),
                          engine_options=_engine_options(config, _state_dir(context)),
                          reward_model_dir=reward_model_dir)
    try:
        result = judge_table(prompts, completions, strict=feedback.strict, llm=llm,
                             verifier_decides="verifier" in feedback.judges, llm_scope=feedback.llm_scope,
                             agreement_sample=feedback.agreement_sample, seed=config.seed * 10_000 + context.number,
                             echo_ngram=feedback.echo_ngram)
    finally:
        if llm is not None:
            llm.close()
    check_verdicts(result, config.quality.max_failed_fraction, llm)
    judged = result.frame
    decided = judged[judged["verdict"] != "none"]
    path = Path(context.work_dir) / "samples.parquet"
    write_parquet(judged, path)
    return JudgedSamples(path=str(path), rows=len(judged), pass_rate=float(decided["passed"].mean()),
                         mean_score=float(decided["score"].mean()), judges=list(feedback.judges),
                         no_verdict=result.no_verdict, agreement=result.agreement,
                         agreement_rows=result.agreement_rows)


def build_round_data(config: FlywheelConfig, context: RoundContext, judged: JudgedSamples, split: PromptSplit,
                     base_dir: Path | None = None, models_dir: Path | None = None,
                     progress: Progress | None = None, refiner: Champion | None = None) -> RoundData:
    """The recipe's strategy (``flywheel.strategies``) turns the judged samples into pairs and SFT rows; the
    strategies that generate (refinement, SAMI, distillation) run the champion and the round's judges again.
    ``base_dir``: where relative model folders in the recipe are found. ``refiner``: SPaR's trained refiner
    (``resolve_refiner``), which then refines instead of the champion."""
    from flywheel.models import resolve_device
    from flywheel.prompts import load_prompts
    from flywheel.strategies import build_strategy_data

    samples = read_table(Path(judged.path))
    work = Path(context.work_dir)
    prompts = load_prompts(Path(split.train_path))
    reward_dir = work / REWARD_MODEL_DIR if "reward_model" in config.feedback.judges else None
    made = build_strategy_data(config, prompts, samples, champion_dir=Path(context.champion.path),
                               base_dir=base_dir or Path.cwd(), device=resolve_device(config.generation.device),
                               engine_options=_engine_options(config, _state_dir(context)),
                               reward_model_dir=reward_dir, models_dir=models_dir,
                               seed=config.seed * 10_000 + context.number, progress=progress,
                               refiner_dir=Path(refiner.path) if refiner else None,
                               held_out=load_prompts(Path(split.eval_path))
                               if config.strategy.name == "repair" and config.strategy.repair.augment_per_row else ())
    write_parquet(made.pairs, work / "pairs.parquet")
    write_parquet(made.sft, work / "sft.parquet")
    record = dict(made.record)
    if refiner is not None:  # the dataset names the model that made its refinements
        record["refiner"] = {"name": refiner_name(config), "version": refiner.version, "sha256": refiner.sha256}
    record_path = None
    if record:
        record_path = str(work / STRATEGY_RECORD)
        write_json({"strategy": config.strategy.name, **record}, Path(record_path))
    return RoundData(samples_path=judged.path, pairs_path=str(work / "pairs.parquet"),
                     sft_path=str(work / "sft.parquet"), samples=len(samples), pairs=len(made.pairs),
                     sft=len(made.sft), strategy=config.strategy.name, stats=made.stats, record_path=record_path,
                     refiner_version=refiner.version if refiner else None)


STRATEGY_RECORD = "strategy.json"
REWARD_MODEL_DIR = "reward_model"


# --- gates ------------------------------------------------------------------------------------------------------

def gate_tables(config: FlywheelConfig, gx_root: Path, tables: Mapping[str, pd.DataFrame], split: PromptSplit, *,
                run_name: str | None = None, docs_dir: Path | None = None,
                build_data_docs: bool = True) -> QualityOutcome:
    """The recipe's quality suites over a round's tables (``flywheel.quality.run_quality_gate``), with what the
    round's prompts say: the held-out prompts to decontaminate against, the languages asked for, and the prompts
    whose instructions limit length. Returns the gate's outcome without enforcing it."""
    from flywheel.prompts import load_prompts
    from flywheel.quality import run_quality_gate
    from flywheel.verifiers import limits_length

    eval_texts = [p.prompt for p in load_prompts(Path(split.eval_path))]
    train_prompts = load_prompts(Path(split.train_path))
    languages = {p.id: c.args["language"] for p in train_prompts
                 for c in p.constraints if c.type == "response_language"}
    limited = {p.id for p in train_prompts if any(limits_length(c.type, c.args) for c in p.constraints)}
    return run_quality_gate(gx_root, tables, eval_prompts=eval_texts, settings=config.quality,
                            expected_languages=languages, limited_prompts=limited, run_name=run_name,
                            docs_dir=docs_dir, build_data_docs=build_data_docs)


def quality_gate(config: FlywheelConfig, workspace: Workspace, context: RoundContext, split: PromptSplit,
                 data: RoundData) -> QualityResult:
    """Validate every table; clean rows go to the round's dataset, failing rows to quarantine with the reason."""
    import pandas as pd

    from flywheel.lineage import CONFIG_SNAPSHOT

    tables = {"samples": read_table(Path(data.samples_path)), "pairs": read_table(Path(data.pairs_path)),
              "sft": read_table(Path(data.sft_path))}
    outcome = gate_tables(config, workspace.gx_root, tables, split, run_name=context.name,
                          docs_dir=Path(context.work_dir) / "data_docs")

    data_dir = Path(context.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # The dataset: the recipe, the round's prompts, then the clean tables and the quarantine.
    write_json(config.model_dump(mode="json"), data_dir / CONFIG_SNAPSHOT)
    atomic_write_text(data_dir / "prompts.jsonl", Path(split.train_path).read_text(encoding="utf-8"))
    paths = {name: data_dir / f"{name}.parquet" for name in tables}
    for name, frame in outcome.clean.items():
        write_parquet(frame, paths[name])
    quarantine_path = data_dir / "quarantine.parquet"
    write_parquet(outcome.quarantine if len(outcome.quarantine) else pd.DataFrame(
        columns=["table", "row_id", "reasons", "row_json"]), quarantine_path)
    # The dataset's copy leaves out where and when GX ran (absolute paths, result ids): the same rows must hash the
    # same in any workspace, so a round re-run from its tag reproduces its DVC hash.
    write_json(outcome.report.model_dump(mode="json", exclude={
        "validation_result_ids": True, "data_docs_path": True, "context_root": True,
        "tables": {"__all__": {"validation_result_id"}},
    }), data_dir / "quality.json")
    record_path = None
    if data.record_path:  # what the strategy made besides its tables (principles, guidelines) is data too
        record_path = str(data_dir / STRATEGY_RECORD)
        atomic_write_text(Path(record_path), Path(data.record_path).read_text(encoding="utf-8"))
    clean = RoundData(samples_path=str(paths["samples"]), pairs_path=str(paths["pairs"]), sft_path=str(paths["sft"]),
                      samples=len(outcome.clean["samples"]), pairs=len(outcome.clean["pairs"]),
                      sft=len(outcome.clean["sft"]), strategy=data.strategy, stats=data.stats,
                      record_path=record_path, refiner_version=data.refiner_version)
    return QualityResult(report=outcome.report, quarantine_path=str(quarantine_path), clean=clean,
                         quarantined=len(outcome.quarantine))


def log_quality_artifacts(workspace: Workspace, context: RoundContext, result: QualityResult) -> None:
    """The gate's report and quarantine go to the round's MLflow run, next to its metrics."""
    mlflow_client = registry.client(workspace.tracking_uri)
    data_dir = Path(context.data_dir)
    for name in ("quality.json", "quarantine.parquet"):
        mlflow_client.log_artifact(context.run_id, str(data_dir / name), artifact_path="quality")
    if result.report.data_docs_path:  # the round's Data Docs folder (offline HTML), browsable in MLflow's UI
        mlflow_client.log_artifacts(context.run_id, str(Path(result.report.data_docs_path).parent),
                                    artifact_path="data_docs")


def training_table(config: FlywheelConfig) -> str:
    """The clean table the candidate trains on (GRPO: the prompts of the round's clean samples)."""
    return {"dpo": "pairs", "sft": "sft", "sami": "sft", "grpo": "samples"}[config.training.method]


def apply_review(config: FlywheelConfig, context: RoundContext, quality: QualityResult,
                 decision: ReviewDecision) -> ReviewDecision:
    """Store the decision with the round and move rows the reviewer dropped to quarantine, with the reason."""
    import pandas as pd

    from flywheel.review import check_drop_ids

    data_dir = Path(context.data_dir)
    if decision.dropped_ids:
        table_name = training_table(config)
        path = Path(getattr(quality.clean, f"{table_name}_path"))
        table = read_table(path)
        reason = f"dropped by reviewer {decision.reviewer}" + (f": {decision.notes}" if decision.notes else "")
        quarantine = read_table(Path(quality.quarantine_path))
        # A re-applied decision (a resumed round) finds its rows already moved: never quarantine them twice.
        already = set(quarantine.loc[quarantine["reasons"] == reason, "row_id"])
        check_drop_ids(decision.dropped_ids, set(table["row_id"]) | already)
        dropped = table[table["row_id"].isin(decision.dropped_ids) & ~table["row_id"].isin(already)]
        extra = pd.DataFrame({"table": table_name, "row_id": dropped["row_id"], "reasons": reason,
                              "row_json": [json.dumps(r, default=str) for r in dropped.to_dict(orient="records")]})
        write_parquet(pd.concat([quarantine, extra], ignore_index=True), Path(quality.quarantine_path))
        write_parquet(table[~table["row_id"].isin(decision.dropped_ids)].reset_index(drop=True), path)
    # The dataset copy leaves out when it was decided (kept in the round record and MLflow): a re-run with the same
    # decision versions the same bytes.
    write_json(decision.data_record(), data_dir / "review.json")
    return decision


def human_agreement(config: FlywheelConfig, quality: QualityResult, judged: JudgedSamples,
                    decision: ReviewDecision) -> dict[str, float]:
    """The reviewer as a judge (``flywheel.judges.HumanJudge``): on the rows they saw, how often their verdict (kept
    in an approved round: pass; dropped: fail) matches the round's deciding judge. Call before the decision is applied
    (dropped rows are still in the table). Empty for automatic decisions."""
    from flywheel.judges import HumanJudge
    from flywheel.review import TRAINED_TEXT, annotate_strata

    if decision.mode != "human":
        return {}
    table_name = training_table(config)
    table = annotate_strata(read_table(Path(getattr(quality.clean, f"{table_name}_path"))),
                            read_table(Path(judged.path)), table_name)
    human = HumanJudge.from_review(decision, table.to_dict(orient="records"))
    looked_at = set(decision.sample_ids) | set(decision.dropped_ids)
    seen = [(row_id, verdict) for row_id, verdict in zip(table["row_id"], table["verdict"])
            if row_id in looked_at and verdict in ("pass", "fail")]
    text = TRAINED_TEXT[table_name]
    by_id = dict(zip(table["row_id"], zip(table["prompt_id"], table[text])))
    agree = rows = 0
    for row_id, verdict in seen:
        ok = human.verdicts.get((by_id[row_id][0], str(by_id[row_id][1]).strip()))
        if ok is not None:
            rows += 1
            agree += ok == (verdict == "pass")
    return {"judge.human_rows": float(rows), **({"judge.human_agreement": agree / rows} if rows else {})}


def tag_review(workspace: Workspace, context: RoundContext, decision: ReviewDecision) -> None:
    """The decision as ``flywheel.review.*`` tags on the round's MLflow run: who, when, what, which rows were seen."""
    from mlflow.entities import RunTag

    tags = decision.mlflow_tags(registry.TAG)
    registry.client(workspace.tracking_uri).log_batch(context.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def write_dataset_manifest(config: FlywheelConfig, context: RoundContext, split: PromptSplit) -> DatasetManifest:
    from flywheel.dataset import file_sha256

    data_dir = Path(context.data_dir)
    files = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name != "dataset.json")
    rows = {p.stem: len(read_table(p)) for p in files if p.suffix == ".parquet"}
    manifest = DatasetManifest(round=context.number, files={p.name: file_sha256(p) for p in files}, rows=rows,
                               config_hash=context.config_hash, parent_version=context.champion.version,
                               prompts=split.round_prompts)
    write_json(manifest.model_dump(mode="json"), data_dir / "dataset.json")
    return manifest


def version_round_dataset(workspace: Workspace, context: RoundContext) -> DatasetVersion:
    from flywheel.versioning import version_dataset

    message = f"flywheel: dataset of {context.name} (parent v{context.champion.version}, config {context.config_hash})"
    return version_dataset(workspace.root, context.name, message)


# --- train, evaluate, register, promote -------------------------------------------------------------------------

def train_candidate(config: FlywheelConfig, workspace: Workspace, context: RoundContext, quality: QualityResult,
                    dataset: DatasetVersion) -> TrainedModel:
    from flywheel.training import train

    table = read_table(Path(getattr(quality.clean, f"{training_table(config)}_path")))
    output = workspace.models / config.model.registered_name / "rounds" / context.name
    rows, options = table.to_dict(orient="records"), {}
    if config.training.method == "grpo":
        rows, options = grpo_rows(table, Path(context.data_dir) / "prompts.jsonl"), grpo_options(config, context)
    carried = []
    if config.training.carry_refused_rounds:  # the round records are read only for it
        carried = refused_rounds(read_round_records(workspace), context, config.training.carry_refused_rounds)
        rows += carried_rows(workspace, carried, training_table(config), list(table.columns))
        log_metrics(workspace, context.run_id, {"train.carried_rounds": len(carried), "train.rows_offered": len(rows)})
    # The bound is on what the round teaches; KL anchors (strategy.repair.plain_anchors) come on top, as many as
    # the recipe asks for.
    from flywheel.repair import ANCHOR_ORIGIN

    anchors = [row for row in rows if row.get("origin") == ANCHOR_ORIGIN]
    targets = [row for row in rows if row.get("origin") != ANCHOR_ORIGIN]
    rows = bounded_rows(targets, config.training.max_rows, seed=config.seed * 10_000 + context.number) + anchors

    def sink(metrics: dict[str, float], step: int) -> None:
        log_metrics(workspace, context.run_id, {f"train.{k}": v for k, v in metrics.items()}, step)

    metadata = {"round": context.number, "parent_version": context.champion.version,
                "dataset_md5": dataset.dvc_md5, "strategy": config.strategy.name,
                **({"carried_rounds": carried} if carried else {})}
    checkpoints = Path(context.work_dir) / "checkpoints"
    if config.training.processes > 1:
        trained = _launch_training(config, context, rows, output, metadata, checkpoints, sink)
    else:
        trained = train(Path(context.champion.path), rows, config.training, output, seed=config.seed, metrics=sink,
                        checkpoint_dir=checkpoints, metadata=metadata, method_options=options)
    return trained.model_copy(update={"carried_rounds": carried}) if carried else trained


def refused_rounds(records: list, context: RoundContext, limit: int) -> list[int]:
    """The latest ``limit`` earlier rounds that ran this recipe (config hash) from this round's champion and whose
    candidate was refused: their data is this champion's own, and no trained model took it up."""
    if not limit:  # [-0:] would be every round
        return []
    # A round its reviewer rejected has no promotion: it is never carried.
    refused = [r.round for r in records
               if r.round < context.number and r.config_hash == context.config_hash
               and r.parent_version == context.champion.version and r.promotion is not None
               and not r.promotion.promoted]
    return sorted(refused)[-limit:]


def carried_rows(workspace: Workspace, rounds: list[int], table: str, columns: list[str]) -> list[dict]:
    """The clean ``table`` rows of earlier rounds' datasets. The same recipe writes the same columns; a dataset that
    does not (written by other code) is an error, not a silent mix of rows."""
    rows: list[dict] = []
    for number in rounds:
        path = workspace.round_data(number) / f"{table}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"training.carry_refused_rounds: round {number}'s dataset has no {path.name} "
                                    f"({path}); restore it (dvc checkout at its tag) or set carry_refused_rounds: 0")
        frame = read_table(path)
        if sorted(frame.columns) != sorted(columns):
            raise ValueError(f"training.carry_refused_rounds: round {number}'s {path.name} has columns "
                             f"{sorted(frame.columns)}, this round's {sorted(columns)}; set carry_refused_rounds: 0")
        rows += frame[columns].to_dict(orient="records")
    return rows


def bounded_rows(rows: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` of the rows, a seeded sample in their original order (all of them under the limit)."""
    if limit is None or len(rows) <= limit:
        return rows
    import random

    kept = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in kept]


def _launch_training(config: FlywheelConfig, context: RoundContext, rows: list[dict], output: Path, metadata: dict,
                     checkpoints: Path, sink) -> TrainedModel:
    """``training.processes`` > 1: the same ``train`` in every process of an ``accelerate launch`` subprocess (one per
    GPU); its log and files stay in the round's state folder."""
    from flywheel.launch import LaunchSpec, accelerate_config_for, launch_training, write_rows
    from flywheel.models import resolve_device

    work = Path(context.work_dir) / "launch"
    work.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.jsonl"
    write_rows(rows, rows_path)
    spec = LaunchSpec(base_dir=Path(context.champion.path), rows_path=rows_path, config=config.training,
                      output_dir=output, result_path=work / "result.json", seed=config.seed, metadata=metadata,
                      checkpoint_dir=checkpoints, metrics_path=work / "metrics.jsonl")
    on_cpu = resolve_device(config.training.device) == "cpu"
    return launch_training(spec, processes=config.training.processes, cpu=on_cpu,
                           accelerate_config=None if on_cpu else accelerate_config_for(config.training.accelerate),
                           log_path=work / "train.log", metrics=sink)


# --- SPaR's trained refiner --------------------------------------------------------------------------------------
# With ``strategy.spar.refiner: trained`` the refiner is a model of its own, registered as
# ``<model.registered_name>-refiner``: version 1 is the policy champion's weights (registered on first use, pointing at
# that version's artifacts: no copy), each round's tree search runs its champion, and the train stage trains it with
# SFT on the round's clean refiner rows. It has no held-out evaluation: a trained version becomes its champion.

REFINER_ORIGINS = ("spar:refinement", "spar:judgement")
REFINER_RECORD = "refiner-{dataset}.json"  # the refiner's TrainedModel on a dataset, written before it is registered


def refiner_name(config: FlywheelConfig) -> str:
    return f"{config.model.registered_name}-refiner"


def uses_trained_refiner(config: FlywheelConfig) -> bool:
    return config.strategy.name == "spar" and config.strategy.spar.refiner == "trained"


def resolve_refiner(config: FlywheelConfig, workspace: Workspace, context: RoundContext) -> Champion | None:
    """The refiner this round's search runs (None unless ``spar.refiner: trained``): the refiner's champion; on
    first use the policy champion's weights become refiner version 1. Tags the round's run with it."""
    if not uses_trained_refiner(config):
        return None
    name, uri = refiner_name(config), workspace.tracking_uri
    current = registry.find_version(uri, name, registry.CHAMPION)
    if current is None:
        current = _interrupted_base_registration(uri, name)
        if current is not None:
            registry.client(uri).set_registered_model_alias(name, registry.CHAMPION, current.version)
    if current is None:
        if registry.list_versions(uri, name):
            raise ModelError(f"registered model {name!r} has versions but no {registry.CHAMPION!r} alias: set one "
                             f"in MLflow")
        current = _register_first_refiner(config, workspace, context)
    elif current.tags.get(f"{registry.TAG}round") == str(context.number):
        # This very round trained it already (rebuilt after --restart): refine with the version it started from.
        current = registry.get_version(uri, name, current.tags[f"{registry.TAG}parent_version"])
    path = registry.materialize(uri, current, workspace.models)
    registry.client(uri).set_tag(context.run_id, f"{registry.TAG}spar.refiner_version", current.version)
    return Champion(version=current.version, path=str(path), sha256=current.tags.get(f"{registry.TAG}model_sha256", ""))


def _register_first_refiner(config: FlywheelConfig, workspace: Workspace,
                            context: RoundContext) -> registry.VersionInfo:
    name, uri = refiner_name(config), workspace.tracking_uri
    policy = registry.get_version(uri, config.model.registered_name, context.champion.version)
    mlflow_client = registry.client(uri)
    registry.ensure_registered_model(
        uri, name, description=f"SPaR refiner of {config.model.registered_name}: trained with SFT on each spar "
                               f"round's refinements and judgements; no held-out evaluation.")
    sha256 = policy.tags.get(f"{registry.TAG}model_sha256", context.champion.sha256)
    tags = {f"{registry.TAG}round": "0", f"{registry.TAG}role": "refiner", f"{registry.TAG}model_sha256": sha256,
            f"{registry.TAG}source": f"models:/{policy.name}/{policy.version}"}
    # The policy version's own artifacts: the refiner starts as the same weights, stored once.
    version = mlflow_client.create_model_version(
        name, source=policy.source, run_id=policy.run_id, tags=tags,
        description=f"Initial refiner: the weights of {policy.name} version {policy.version} (sha256 {sha256[:12]}), "
                    f"registered on first use by {context.name}.")
    mlflow_client.set_registered_model_alias(name, registry.CHAMPION, str(version.version))
    return registry.get_version(uri, name, str(version.version))


def refiner_rows(quality: QualityResult) -> list[dict]:
    """The round's clean refiner rows (successful refinements and judgements), as SFT rows."""
    table = read_table(Path(quality.clean.sft_path))
    if "origin" not in table.columns:
        return []
    return table[table["origin"].isin(REFINER_ORIGINS)].to_dict(orient="records")


def refiner_training(config: FlywheelConfig):
    """``training`` as the refiner trains: SFT, in this process, at the refiner's own rate and steps if set."""
    spar, training = config.strategy.spar, config.training
    return training.model_copy(update={
        "method": "sft", "processes": 1, "learning_rate": spar.refiner_learning_rate or training.learning_rate,
        "max_steps": training.max_steps if spar.refiner_max_steps is None else spar.refiner_max_steps})


def train_refiner(config: FlywheelConfig, workspace: Workspace, context: RoundContext, quality: QualityResult,
                  dataset: DatasetVersion):
    """Train the refiner on the round's clean refiner rows, register the new version (round lineage tags and
    ``flywheel.role=refiner``) and make it the refiner's champion. None unless ``spar.refiner: trained``.

    A round without refiner rows (no search solved, or the gate dropped them) trains nothing and keeps the champion.
    A re-run finishes what an attempt left: a registered version is reused, a trained one is registered."""
    from flywheel.training import RefinerUpdate, TrainedModel, train

    if not uses_trained_refiner(config):
        return None
    name, uri = refiner_name(config), workspace.tracking_uri
    used = quality.clean.refiner_version
    if used is None:
        raise ModelError(f"{context.name}: its data names no refiner version (built with spar.refiner: policy); "
                         f"re-run the round with --restart")
    # Keyed by the dataset: a round rebuilt with --restart on other data trains again.
    record_path = Path(context.work_dir) / REFINER_RECORD.format(dataset=dataset.dvc_md5[:16])
    trained = TrainedModel.model_validate_json(record_path.read_text()) if record_path.is_file() else None
    existing = registry.find_round_version(uri, name, context.number)
    if existing is None and trained is None:
        rows = refiner_rows(quality)
        log_metrics(workspace, context.run_id, {"refiner.rows": len(rows)})
        if not rows:
            return RefinerUpdate(name=name, used_version=used, version=used, trained=None,
                                 reason=f"no clean refiner rows this round: refiner version {used} stays champion")
        base = registry.materialize(uri, registry.get_version(uri, name, used), workspace.models)

        def sink(metrics: dict[str, float], step: int) -> None:
            log_metrics(workspace, context.run_id, {f"refiner.train.{k}": v for k, v in metrics.items()}, step)

        trained = train(base, rows, refiner_training(config), workspace.models / name / "rounds" / context.name,
                        seed=config.seed, metrics=sink, metadata={"round": context.number, "parent_version": used,
                                                                  "dataset_md5": dataset.dvc_md5, "role": "refiner"})
        atomic_write_text(record_path, trained.model_dump_json())
    if existing is None:
        assert trained is not None
        tags = {
            **_lineage_tags(context, dataset, trained, used),
            f"{registry.TAG}policy_version": context.champion.version,
            f"{registry.TAG}role": "refiner",
            f"{registry.TAG}strategy": "spar",
            f"{registry.TAG}evaluation": "none (the refiner has no held-out evaluation)",
        }
        existing = registry.register_model_dir(
            uri, name, Path(trained.path), context.run_id, tags=tags, artifact_path="refiner",
            description=f"SPaR refiner trained in {context.name} from refiner version {used} with SFT on "
                        f"{trained.rows} refiner rows (refinements and judgements). Not evaluated on held-out "
                        f"prompts: it becomes the refiner's champion unconditionally.")
    registry.client(uri).set_tag(context.run_id, f"{registry.TAG}spar.refiner_trained_version", existing.version)
    registry.set_champion(uri, name, existing.version, actor="spar:refiner",
                          reason=f"trained in {context.name}; the refiner has no held-out evaluation")
    if trained is None:  # registered by an attempt whose record is gone: the version's tags keep its lineage
        return RefinerUpdate(name=name, used_version=used, version=existing.version, trained=None,
                             reason=f"version {existing.version} registered by an earlier attempt of {context.name}")
    return RefinerUpdate(name=name, used_version=used, version=existing.version, trained=trained,
                         reason=f"trained on {trained.rows} refiner rows; champion without held-out evaluation")


def train_models(config: FlywheelConfig, workspace: Workspace, context: RoundContext, quality: QualityResult,
                 dataset: DatasetVersion) -> TrainedModel:
    """The train stage: the SPaR refiner (if trained) first, then the candidate. The refiner goes first because its
    registration makes its re-run free: a round killed while the candidate trains does not train the refiner again."""
    refiner = train_refiner(config, workspace, context, quality, dataset)
    trained = train_candidate(config, workspace, context, quality, dataset)
    return trained if refiner is None else trained.model_copy(update={"refiner": refiner})


def _lineage_tags(context: RoundContext, dataset: DatasetVersion, trained: TrainedModel,
                  parent_version: str) -> dict[str, str]:
    """What every version a round trains records of where it came from: round, data, code, config, parent, weights."""
    return {
        f"{registry.TAG}round": str(context.number),
        f"{registry.TAG}round_tag": dataset.tag,
        f"{registry.TAG}dataset_md5": dataset.dvc_md5,
        f"{registry.TAG}git_commit": dataset.commit,
        f"{registry.TAG}config_hash": context.config_hash,
        f"{registry.TAG}parent_version": parent_version,
        f"{registry.TAG}model_sha256": trained.sha256,
        f"{registry.TAG}train_loss": f"{trained.train_loss:.6f}",
        f"{registry.TAG}training_method": trained.method,
        **({f"{registry.TAG}carried_rounds": ",".join(map(str, trained.carried_rounds))}
           if trained.carried_rounds else {}),
    }


def _refiner_tags(quality: QualityResult, trained: TrainedModel) -> dict[str, str]:
    """The policy version's SPaR refiner lineage: the refiner version that refined its data, and the one trained."""
    tags = {}
    if quality.clean.refiner_version is not None:
        tags[f"{registry.TAG}spar.refiner_version"] = quality.clean.refiner_version
    if trained.refiner is not None and trained.refiner.version != trained.refiner.used_version:
        tags[f"{registry.TAG}spar.refiner_trained_version"] = trained.refiner.version
    return tags


def grpo_rows(samples, prompts_path: Path) -> list[dict]:
    """GRPO trains on prompts: those of the round's clean samples (a prompt whose samples were all quarantined or
    dropped by a reviewer is left out), with their constraints for the verifier reward."""
    from flywheel.prompts import load_prompts

    kept = set(samples["prompt_id"])
    return [{"prompt_id": p.id, "prompt": p.prompt,
             "constraints": json.dumps(p.model_dump(mode="json")["constraints"])}
            for p in load_prompts(prompts_path) if p.id in kept]


def grpo_options(config: FlywheelConfig, context: RoundContext) -> dict:
    grpo, gen = config.strategy.grpo, config.generation
    reward_dir = Path(context.work_dir) / REWARD_MODEL_DIR
    return {"options": grpo, "max_completion_length": grpo.max_completion_length or gen.max_new_tokens,
            "temperature": gen.temperature, "strict": config.feedback.strict,
            "reward_model_dir": reward_dir if "reward_model" in grpo.rewards else None}


def _engine_options(config: FlywheelConfig, state_dir: Path) -> dict:
    """The local engines' settings: the transformers engine's precision, and the ctranslate2 engine's (converted
    models are cached in the workspace's state dir, next to the model store, keyed by each model's sha256: rounds,
    standalone evaluation and generation share the cache)."""
    gen = config.generation
    return {"compute_type": gen.compute_type, "threads": gen.threads, "cache_dir": state_dir / "ctranslate2",
            "precision": gen.precision}


def _state_dir(context: RoundContext) -> Path:
    return Path(context.work_dir).parents[1]  # work_dir is <state>/work/round-NNNN


def _evaluation_engine(config: FlywheelConfig, model_dir: Path, state_dir: Path):
    from flywheel.generation import make_engine
    from flywheel.models import resolve_device

    # Evaluation scores local model folders (the fresh candidate above all), which an endpoint does not serve.
    engine_name = "transformers" if config.generation.engine == "openai" else config.generation.engine
    return make_engine(engine_name, model_dir, resolve_device(config.generation.device), config.evaluation.batch_size,
                       **_engine_options(config, state_dir))


def greedy_eval(config: FlywheelConfig, model_dir: Path, prompts: Sequence[Prompt], progress: Progress | None,
                state_dir: Path):
    """The model's greedy answers to ``prompts`` (``evaluation`` settings), judged by the verifiers strictly and
    loosely: the table every evaluation scores."""
    from flywheel.feedback import judge_with_verifiers
    from flywheel.generation import SamplingParams, close_engine, user_request

    ev = config.evaluation
    engine = _evaluation_engine(config, model_dir, state_dir)
    try:
        completions = engine.generate([user_request(p.prompt) for p in prompts], 1,
                                      SamplingParams(max_new_tokens=ev.max_new_tokens), progress)
    finally:
        close_engine(engine)
    judged = judge_with_verifiers(prompts, completions, strict=ev.strict)
    # The same answers checked loosely too (IFEval reports both): how much is formatting noise around the answer.
    loose = judge_with_verifiers(prompts, completions, strict=False)
    return judged.assign(loose_passed=loose["passed"].to_numpy(), loose_checks=loose["checks"].to_numpy())


def open_ended_comparison(config: FlywheelConfig, base_dir: Path, state_dir: Path, candidate_dir: Path,
                          champion_dir: Path, *, limit: int | None = None, judge: str | None = None,
                          rows_path: Path | None = None, progress: Progress | None = None):
    """The open-ended win rate (``flywheel.open_ended``): both models answer the open-ended prompts greedily, the
    judge (``evaluation.open_ended_judge`` unless ``judge`` is given) compares each pair in both orders. ``limit``:
    prompts (default ``evaluation.open_ended``). ``rows_path``: the answers and verdicts as a parquet table."""
    import pandas as pd

    from flywheel.generation import close_engine
    from flywheel.judges import build_llm_judge
    from flywheel.models import resolve_device
    from flywheel.open_ended import answer, judge_pairs, load_open_ended, summarize_pairs

    ev = config.evaluation
    judge = judge or ev.open_ended_judge
    if judge not in ("self", "teacher"):
        raise ValueError(f"open-ended prompts need an LLM judge (self or teacher), not {judge!r}: "
                         "the verifier has nothing to check there")
    if judge == "teacher" and config.feedback.teacher is None:
        raise ValueError("the teacher judge needs a feedback.teacher section in the recipe")
    prompts = load_open_ended(ev.open_ended_prompts, limit or ev.open_ended or 32, base_dir)
    answers = {}
    for label, model_dir in (("candidate", candidate_dir), ("champion", champion_dir)):
        engine = _evaluation_engine(config, Path(model_dir), state_dir)
        try:
            answers[label] = answer(engine, prompts, ev.max_new_tokens, progress)
        finally:
            close_engine(engine)
    # The judge as the round's feedback builds it, deciding every row (a validated copy would refuse a teacher
    # section next to judges: [self]).
    feedback = config.feedback.model_copy(update={"judges": [judge], "llm_scope": "all"})
    llm = build_llm_judge(config.model_copy(update={"feedback": feedback}), Path(champion_dir), base_dir,
                          device=resolve_device(config.generation.device),
                          engine_options=_engine_options(config, state_dir))
    try:
        verdicts = judge_pairs(llm.engine, prompts, answers["candidate"], answers["champion"],
                               max_new_tokens=config.feedback.judge_max_new_tokens)
    finally:
        llm.close()
    if rows_path is not None:
        write_parquet(pd.DataFrame([{"prompt_id": p.id, "prompt": p.prompt, "candidate": mine, "champion": theirs,
                                     **v.model_dump(exclude={"prompt_id"})}
                                    for p, mine, theirs, v in zip(prompts, answers["candidate"],
                                                                  answers["champion"], verdicts)]), rows_path)
    return summarize_pairs(verdicts, judge, llm.source, ev.open_ended_prompts)


def lineage_base(tracking_uri: str, name: str, version: str) -> registry.VersionInfo | None:
    """The base model a version descends from: up its parents to the version registered on first use (round 0).
    None when the chain breaks (a version registered by hand, without a parent), so its drift cannot be measured."""
    seen: set[str] = set()
    info = registry.get_version(tracking_uri, name, version)
    while info.tags.get(f"{registry.TAG}round") != "0":
        # Versions record their base (register_candidate): one lookup instead of one per round since the base.
        parent = info.tags.get(f"{registry.TAG}base_version") or info.tags.get(f"{registry.TAG}parent_version")
        if parent is None or info.version in seen:
            return None
        seen.add(info.version)
        info = registry.get_version(tracking_uri, name, parent)
    return info


def model_key(name: str, info) -> str:
    """A registered version's identity for caches: its weights' digest, or its name and version for a version
    registered without one (an old record)."""
    return info.tags.get(f"{registry.TAG}model_sha256") or f"{name}-v{info.version}"


def probe_perplexity(workspace: Workspace, key: str, model_dir: Callable[[], Path], device: str) -> float:
    """A model's general-text probe perplexity (``flywheel.probe``), measured once per model (``key``: its weights'
    digest), probe texts and device; one cache serves the champion, the candidate, the base and ``flywheel eval``.
    ``model_dir`` gives the model's folder, and is called only when the figure is not cached: a registered base is
    then materialized."""
    import hashlib

    from flywheel import probe

    digest = hashlib.sha256(b"\0".join([key.encode(), json.dumps(probe.PROBE_TEXTS).encode(), device.encode()]))
    cache = workspace.state / "evals" / f"probe-{digest.hexdigest()[:20]}.json"
    if cache.is_file():
        return float(json.loads(cache.read_text())["perplexity"])
    value = probe.perplexity(model_dir(), device=device)
    write_json({"model": key, "device": device, "perplexity": value}, cache)
    return value


def base_probe_perplexity(workspace: Workspace, name: str, version: str, device: str) -> tuple[str, float] | None:
    """(version, probe perplexity) of the base a registered version descends from; None when it has no lineage."""
    base = lineage_base(workspace.tracking_uri, name, version)
    if base is None:
        return None
    value = probe_perplexity(workspace, model_key(name, base), device=device,
                             model_dir=lambda: registry.materialize(workspace.tracking_uri, base, workspace.models))
    return base.version, value


def check_evaluation_tables(config: FlywheelConfig, workspace: Workspace, context: RoundContext, tables: dict) -> None:
    """The evaluation results go through the ``flywheel_evaluation`` suite (into the round's Data Docs); they are
    never filtered (that would bias the comparison): any failed check stops the round, naming it."""
    from flywheel.quality import enforce, run_quality_gate

    work = Path(context.work_dir)
    checked = run_quality_gate(workspace.gx_root, tables, eval_prompts=[],
                               settings=config.quality.model_copy(update={"max_failed_fraction": 0.0}),
                               run_name=f"{context.name}-evaluation", docs_dir=work / "data_docs")
    write_json(checked.report.model_dump(mode="json"), work / "evaluation_quality.json")
    if len(checked.quarantine):
        write_parquet(checked.quarantine, work / "evaluation_failed_rows.parquet")
    if checked.report.data_docs_path:
        registry.client(workspace.tracking_uri).log_artifacts(
            context.run_id, str(Path(checked.report.data_docs_path).parent), artifact_path="data_docs")
    enforce(checked.report)


def evaluation_cache(config: FlywheelConfig, workspace: Workspace, split: PromptSplit, model: str,
                     device: str) -> Path:
    """Where a model's greedy held-out answers are kept, by the model's identity (``model``: its weights' digest)
    and everything else the answers depend on: the prompts, the evaluation and generation settings, the device. A
    candidate's answers are therefore its own answers as next round's champion: a promoted model is not evaluated
    twice."""
    import hashlib

    key = hashlib.sha256(b"\0".join([model.encode(), Path(split.eval_path).read_bytes(),
                                      config.evaluation.model_dump_json().encode(),
                                      config.generation.model_dump_json().encode(), device.encode()]))
    return workspace.state / "evals" / f"answers-{key.hexdigest()[:20]}.parquet"


def evaluate_candidate(config: FlywheelConfig, workspace: Workspace, context: RoundContext, split: PromptSplit,
                       trained: TrainedModel, progress: Progress | None = None) -> Evaluation:
    """Both models answer the held-out prompts greedily; a model's answers and probe are cached by its digest."""
    from flywheel.evaluation import compare, echoed_answers, repetitive_answers
    from flywheel.models import resolve_device
    from flywheel.prompts import load_prompts

    device = resolve_device(config.generation.device)
    eval_prompts = load_prompts(Path(split.eval_path))
    # A champion registered without its digest (an old record) is cached under its version instead.
    champion_key = context.champion.sha256 or f"{config.model.registered_name}-v{context.champion.version}"
    cache = evaluation_cache(config, workspace, split, champion_key, device)
    if cache.is_file():
        champion = read_table(cache)
    else:
        champion = greedy_eval(config, Path(context.champion.path), eval_prompts, progress, workspace.state)
        write_parquet(champion, cache)
    champion_perplexity = probe_perplexity(workspace, champion_key, lambda: Path(context.champion.path), device)
    candidate = greedy_eval(config, Path(trained.path), eval_prompts, progress, workspace.state)
    write_parquet(candidate, evaluation_cache(config, workspace, split, trained.sha256, device))
    candidate_perplexity = probe_perplexity(workspace, trained.sha256, lambda: Path(trained.path), device)
    work = Path(context.work_dir)
    write_parquet(candidate, work / "eval_candidate.parquet")
    write_parquet(champion, work / "eval_champion.parquet")
    check_evaluation_tables(config, workspace, context, {"eval_candidate": candidate, "eval_champion": champion})
    base = base_probe_perplexity(workspace, config.model.registered_name, context.champion.version, device=device)
    echo_ngram = config.feedback.echo_ngram
    limits = text_limits(config.quality)
    evaluation = compare(candidate, champion).model_copy(update={
        "candidate_echoes": echoed_answers(candidate, eval_prompts, echo_ngram),
        "champion_echoes": echoed_answers(champion, eval_prompts, echo_ngram),
        "candidate_repetitive": repetitive_answers(candidate, limits),
        "champion_repetitive": repetitive_answers(champion, limits),
        "candidate_perplexity": candidate_perplexity,
        "champion_perplexity": champion_perplexity,
        **({"base_version": base[0], "base_perplexity": base[1]} if base is not None else {}),
    })
    if config.evaluation.open_ended:
        evaluation = evaluation.model_copy(update={"open_ended": open_ended_comparison(
            config, workspace.root, workspace.state, Path(trained.path), Path(context.champion.path),
            rows_path=work / "eval_open_ended.parquet", progress=progress)})
    log_metrics(workspace, context.run_id, evaluation.metrics())
    return evaluation


def describe_version(context: RoundContext, data: RoundData, evaluation: Evaluation) -> str:
    cand, champ = evaluation.candidate, evaluation.champion
    changes = [f"{kind} {champ.per_type.get(kind, 0):.2f}->{value:.2f}" for kind, value in cand.per_type.items()
               if abs(value - champ.per_type.get(kind, 0)) >= 1e-9]
    return (f"Trained in {context.name} from version {context.champion.version} ({data.strategy}) on {data.pairs} "
            f"pairs / {data.sft} SFT rows. Held-out prompt accuracy {champ.prompt_accuracy:.3f} -> {cand.prompt_accuracy:.3f}, "
            f"win rate vs champion {evaluation.win_rate:.3f}"
            + (f", open-ended win rate {evaluation.open_ended.win_rate:.3f} ({evaluation.open_ended.judge} judge, "
               f"{evaluation.open_ended.prompts} prompts)" if evaluation.open_ended else "")
            + f". Per type: {', '.join(changes) or 'unchanged'}.")


def register_candidate(config: FlywheelConfig, workspace: Workspace, context: RoundContext, quality: QualityResult,
                       dataset: DatasetVersion, trained: TrainedModel, evaluation: Evaluation,
                       decision: ReviewDecision) -> Registration:
    name, uri = config.model.registered_name, workspace.tracking_uri
    existing = registry.find_round_version(uri, name, context.number)
    if existing is None:
        tags = {
            **_lineage_tags(context, dataset, trained, context.champion.version),
            f"{registry.TAG}review": f"{'approved' if decision.approved else 'rejected'} by {decision.reviewer}",
            f"{registry.TAG}strategy": quality.clean.strategy,
            f"{registry.TAG}judges": ",".join(config.feedback.judges),
            **{f"{registry.TAG}{k}": f"{v:.6f}" for k, v in evaluation.metrics().items() if "type." not in k},
            **_refiner_tags(quality, trained),
            **({f"{registry.TAG}base_version": evaluation.base_version} if evaluation.base_version else {}),
        }
        existing = registry.register_model_dir(
            uri, name, Path(trained.path), context.run_id, tags=tags, aliases=(registry.CANDIDATE,),
            description=describe_version(context, quality.clean, evaluation),
        )
        mlflow_client = registry.client(uri)
        for key in ("round_tag", "dataset_md5", "git_commit", "strategy", "judges"):
            mlflow_client.set_tag(context.run_id, f"{registry.TAG}{key}", tags[f"{registry.TAG}{key}"])
    elif registry.CANDIDATE not in existing.aliases:
        # Registered by an attempt killed before it set the alias: finish that registration, never make a second.
        registry.client(uri).set_registered_model_alias(name, registry.CANDIDATE, existing.version)
        existing = registry.get_version(uri, name, existing.version)
    return Registration(version=existing.version, aliases=existing.aliases, run_id=context.run_id)


def decide_promotion(config: FlywheelConfig, workspace: Workspace, registration: Registration,
                     evaluation: Evaluation, decision: ReviewDecision) -> registry.Promotion:
    from flywheel.evaluation import promotion_verdict

    name, policy = config.model.registered_name, config.promotion
    done = _finished_promotion(workspace, name, registration.version)
    if done is not None:
        return done
    ok, reasons = promotion_verdict(
        evaluation, decision.approved and decision.mode == "human", min_gain=policy.min_gain,
        max_type_regression=policy.max_type_regression, max_perplexity_increase=policy.max_perplexity_increase,
        require_human_approval=policy.require_human_approval, min_type_support=policy.min_type_support,
        type_regression_alpha=policy.type_regression_alpha, gain_metric=policy.gain_metric,
        gain_alpha=policy.gain_alpha, max_perplexity_increase_vs_base=policy.max_perplexity_increase_vs_base,
    )
    summary = "; ".join(reasons)
    if policy.mode == "manual":
        return registry.Promotion(name=name, version=registration.version, previous=None, promoted=False,
                                  reason=f"promotion.mode is manual (policy would {'' if ok else 'not '}promote: "
                                         f"{summary}); run `flywheel promote {registration.version}`")
    if ok:
        return registry.set_champion(workspace.tracking_uri, name, registration.version, actor="policy:auto",
                                     reason=summary)
    return registry.Promotion(name=name, version=registration.version, previous=None, promoted=False,
                              reason=f"{summary}: champion unchanged")


def _finished_promotion(workspace: Workspace, name: str, version: str) -> registry.Promotion | None:
    """The promotion an earlier attempt of this round made before it was killed, read back from the registry."""
    current = registry.find_version(workspace.tracking_uri, name, registry.CHAMPION)
    if current is None or current.version != version or registry.PROMOTED_AT not in current.tags:
        return None
    return registry.Promotion(name=name, version=version, previous=current.tags.get(f"{registry.TAG}promoted_over"),
                              promoted=True, reason=current.tags.get(f"{registry.TAG}promotion_reason", ""))


def write_round_record(workspace: Workspace, record: RoundRecord) -> Path:
    path = workspace.records / f"{record.name}.json"
    atomic_write_text(path, record.model_dump_json(indent=2))
    return path


def read_round_records(workspace: Workspace) -> list[RoundRecord]:
    records = [RoundRecord.model_validate_json(p.read_text()) for p in workspace.records.glob("*.json")]
    return sorted(records, key=lambda r: r.round)


def close_round(workspace: Workspace, context: RoundContext, record: RoundRecord) -> Path:
    mlflow_client = registry.client(workspace.tracking_uri)
    log_metrics(workspace, context.run_id, {
        "generate.tokens_per_second": record.generations.tokens_per_second,
        "generate.seconds": record.generations.seconds,
        "judge.pass_rate": record.judged.pass_rate,
        "judge.mean_score": record.judged.mean_score,
        "judge.no_verdict": record.judged.no_verdict,
        **({"judge.agreement": record.judged.agreement} if record.judged.agreement is not None else {}),
        "data.pairs": record.quality.clean.pairs,
        "data.sft_rows": record.quality.clean.sft,
    })
    path = write_round_record(workspace, record)
    mlflow_client.log_artifact(context.run_id, str(path))
    mlflow_client.set_terminated(context.run_id)
    return path


def fail_round(workspace: Workspace, context: RoundContext, error: BaseException) -> None:
    """Mark the round's MLflow run FAILED with the reason, so no run is left RUNNING forever."""
    mlflow_client = registry.client(workspace.tracking_uri)
    mlflow_client.set_tag(context.run_id, f"{registry.TAG}failure", f"{type(error).__name__}: {error}"[:5000])
    mlflow_client.set_terminated(context.run_id, status="FAILED")
