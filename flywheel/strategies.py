"""Strategies: how a round turns its judged samples into training data, chosen by ``strategy.name`` in the recipe.

* ``best_of_n`` (rejection sampling): per prompt, the best sample by the judges is chosen and the worst rejected;
  accepted samples are SFT targets (``flywheel.dataset``).
* ``repair``: failed answers get the mechanical fixes of the instructions they break (``flywheel.repair``); the
  pair (repaired, original) takes the place of the best-of-n pair of its prompt.
* ``self_refine`` (SELF) and ``spar`` (SPaR): failed answers are critiqued and rewritten by the policy
  (``flywheel.refine``); their pairs take the place of the best-of-n pair of the same prompt.
* ``sami``: answers under sampled constitutions for the SAMI contrastive loss (``flywheel.sami``).
* ``distill``: a teacher answers with the student's guideline; the student learns the answers (``flywheel.distill``).
* ``grpo``: online; the round's prompts are the training data (``flywheel.reward``), the best-of-n tables are kept
  as the round's record.

Every row carries ``origin`` (strategy and step) and ``judge`` (who decided it), so lineage shows how it was made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.dataset import PAIR_COLUMNS, SFT_COLUMNS, build_pairs, build_sft
from flywheel.prompts import Prompt

PROVENANCE = ["origin", "judge"]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class StrategyData:
    pairs: Any  # DataFrame: PAIR_COLUMNS + origin, judge (+ the strategy's own columns)
    sft: Any  # DataFrame: SFT_COLUMNS + origin, judge (+ the strategy's own columns)
    stats: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # what else the round's dataset keeps (principles, ...)


def best_of_n(samples, config: FlywheelConfig) -> StrategyData:
    """The baseline: best vs worst sample per prompt; accepted samples as SFT targets."""
    pairs, sft = build_pairs(samples, config.feedback), build_sft(samples, config.feedback)
    judges = samples.drop_duplicates("prompt_id").set_index("prompt_id")["judge"] if len(samples) else {}
    pairs = pairs.assign(origin="best_of_n:pair", judge=[judges[p] for p in pairs["prompt_id"]])
    sft = sft.assign(origin="best_of_n:accepted", judge=[judges[p] for p in sft["prompt_id"]])
    return StrategyData(pairs=_typed(pairs, PAIR_COLUMNS), sft=_typed(sft, [*SFT_COLUMNS, "ended"]),
                        stats={"best_of_n_pairs": float(len(pairs)), "best_of_n_sft": float(len(sft))})


def merge_refined(base: StrategyData, pairs, sft, stats: dict[str, float],
                  chosen_must_pass: bool = False) -> StrategyData:
    """A refinement pair replaces the best-of-n pair of its prompt (one pair per prompt); SFT rows add up.
    ``chosen_must_pass``: a refinement that improved without passing makes no pair (``feedback.chosen_must_pass``)."""
    import pandas as pd

    if chosen_must_pass:
        pairs = pairs[pairs["chosen_score"] >= 1.0]

    kept = base.pairs[~base.pairs["prompt_id"].isin(set(pairs["prompt_id"]))]
    merged_pairs = pd.concat([pairs, kept], ignore_index=True).sort_values("prompt_id", kind="stable")
    merged_sft = pd.concat([base.sft, sft], ignore_index=True).drop_duplicates(["prompt", "completion"])
    if "ended" in merged_sft.columns:  # rows of a table written without it: as before, they end
        merged_sft["ended"] = merged_sft["ended"].astype("boolean").fillna(True).astype(bool)
    return StrategyData(pairs=merged_pairs.reset_index(drop=True), sft=merged_sft.reset_index(drop=True),
                        stats={**base.stats, **stats})


def build_strategy_data(config: FlywheelConfig, prompts: Sequence[Prompt], samples, *, champion_dir: Path,
                        base_dir: Path, device: str, engine_options: dict | None = None,
                        reward_model_dir: Path | None = None, models_dir: Path | None = None, seed: int = 0,
                        progress: Progress | None = None, refiner_dir: Path | None = None,
                        held_out: Sequence[Prompt] = ()) -> StrategyData:
    """The recipe's strategy over the round's judged samples (``flywheel.feedback.SAMPLE_COLUMNS``).
    ``refiner_dir``: SPaR's trained refiner (``spar.refiner: trained``), which then refines instead of the policy.
    ``held_out``: the evaluation prompts, which the prompts that repair's augmentation writes must not overlap."""
    name = config.strategy.name
    base = best_of_n(samples, config)
    if name in ("best_of_n", "grpo"):
        return base
    if name == "repair":
        from flywheel.repair import repair_samples
        from flywheel.textchecks import NgramIndex

        settings = config.strategy.repair
        # Contrast, hindsight and anchor rows have prompts of their own, which must not overlap the held-out ones.
        avoid = (NgramIndex.build([p.prompt for p in held_out], config.quality.decontamination_ngram)
                 if settings.contrast_types or settings.augment_per_row or settings.plain_anchors else None)
        result = repair_samples(prompts, samples, settings, strict=config.feedback.strict, avoid=avoid,
                                echo_ngram=config.feedback.echo_ngram)
        merged = merge_refined(base, result.pairs, result.sft, _prefixed("repair", result.stats),
                               config.feedback.chosen_must_pass)
        if not settings.augment_per_row and not settings.plain_anchors:
            return merged
        import pandas as pd

        from flywheel.repair import augment_rows, plain_anchor_rows

        parts, stats = [merged.sft], dict(merged.stats)
        if settings.augment_per_row:
            extra = augment_rows(prompts, merged.sft, settings, seed=seed, strict=config.feedback.strict,
                                 avoid=avoid, echo_ngram=config.feedback.echo_ngram)
            parts.append(extra.sft)
            stats.update(_prefixed("repair", extra.stats))
        if settings.plain_anchors:
            anchors = plain_anchor_rows(prompts, samples, settings.plain_anchors, seed=seed, avoid=avoid)
            parts.append(anchors)
            stats["repair_anchors"] = float(len(anchors))
        sft = pd.concat(parts, ignore_index=True).drop_duplicates(["prompt", "completion"])
        return StrategyData(pairs=merged.pairs, sft=sft.reset_index(drop=True), stats=stats)
    from flywheel.generation import make_engine

    gen = config.generation
    options = dict(engine_options or {})
    if name == "spar" and refiner_dir is not None:
        # SPaR only refines (the policy's answers are the samples table's): only the refiner is loaded, as
        # ``policy`` below. An endpoint serves the policy, not the refiner, so the refiner runs locally.
        policy = make_engine("transformers" if gen.engine == "openai" else gen.engine, refiner_dir, device,
                             gen.batch_size, **options)
    else:
        policy = make_engine(gen.engine, champion_dir, device, gen.batch_size, endpoint=gen.openai, **options)
    judge = round_judge(config, champion_dir, base_dir, device, options, reward_model_dir)
    try:
        if name == "self_refine":
            from flywheel.refine import self_refine

            result = self_refine(prompts, samples, policy, judge, config.strategy.self_refine,
                                 max_new_tokens=gen.max_new_tokens, seed=seed, progress=progress)
            return merge_refined(base, result.pairs, result.sft, _prefixed("self_refine", result.stats),
                                 config.feedback.chosen_must_pass)
        if name == "spar":
            from flywheel.refine import spar_search

            result = spar_search(prompts, samples, policy, judge, config.strategy.spar,
                                 max_new_tokens=gen.max_new_tokens, seed=seed,
                                 judge_deterministic=judge.deterministic_for([(p, "") for p in prompts]),
                                 progress=progress)
            return merge_refined(base, result.pairs, result.sft, _prefixed("spar", result.stats),
                                 config.feedback.chosen_must_pass)
        if name == "sami":
            return _sami(config, prompts, policy, judge, champion_dir, base_dir, device, options, seed, progress)
        if name == "distill":
            return _distill(config, prompts, policy, judge, base, base_dir, models_dir, device, options, seed,
                            progress)
    finally:
        _close(policy)
        _close(judge.llm)
    raise ValueError(f"unknown strategy {name!r}")


def round_judge(config: FlywheelConfig, champion_dir: Path, base_dir: Path, device: str, engine_options: dict,
                reward_model_dir: Path | None = None):
    """The recipe's judges as one ``flywheel.feedback.RoundJudge``."""
    from flywheel.feedback import RoundJudge
    from flywheel.judges import build_llm_judge

    feedback = config.feedback
    llm = build_llm_judge(config, champion_dir, base_dir, device=device, engine_options=engine_options,
                          reward_model_dir=reward_model_dir)
    return RoundJudge(strict=feedback.strict, llm=llm, verifier_decides="verifier" in feedback.judges,
                      llm_scope=feedback.llm_scope, echo_ngram=feedback.echo_ngram)


def _sami(config, prompts, policy, judge, champion_dir, base_dir, device, options, seed, progress) -> StrategyData:
    from flywheel.config import resolve
    from flywheel.generation import make_engine
    from flywheel.sami import sami_rows, write_constitution_parts

    sami, gen = config.strategy.sami, config.generation
    if sami.writer == "self":
        writer = policy
    elif sami.writer == "none":
        writer = None
    else:
        writer = make_engine("transformers" if gen.engine == "openai" else gen.engine,
                             resolve(sami.writer, base_dir), device, gen.batch_size, **options)
    try:
        parts = write_constitution_parts(writer, list(sami.principles), sami.written_principles,
                                         max_new_tokens=sami.writer_max_new_tokens, seed=seed)
    finally:
        if writer is not None and writer is not policy:
            _close(writer)
    rows = sami_rows(prompts, policy, parts, sami, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                     top_p=gen.top_p, seed=seed, judge=judge, progress=progress)
    import pandas as pd

    stats = {"sami_rows": float(len(rows)), "sami_principles": float(len(parts.principles)),
             "sami_written": float(parts.written), "sami_antithesis_fallbacks": float(parts.fallbacks)}
    record = {"principles": list(parts.principles), "antitheses": list(parts.antitheses)}
    return StrategyData(pairs=pd.DataFrame(columns=PAIR_COLUMNS + PROVENANCE), sft=rows, stats=stats, record=record)


def _distill(config, prompts, policy, judge, base: StrategyData, base_dir, models_dir, device, options, seed,
             progress) -> StrategyData:
    from flywheel.config import BUILTIN_PREFIX
    from flywheel.distill import distill, make_teacher_engine
    from flywheel.models import provision_base

    settings, gen = config.strategy.distill, config.generation
    assert settings is not None  # the config requires the section with this strategy
    teacher_config = settings.teacher
    if teacher_config.base_url is None and teacher_config.model.startswith(BUILTIN_PREFIX):
        if models_dir is None:
            raise ValueError("a builtin teacher needs the workspace's model store")
        teacher_config = teacher_config.model_copy(
            update={"model": provision_base(teacher_config.model, models_dir, base_dir).path})
    teacher, source = make_teacher_engine(teacher_config, base_dir, device, gen.batch_size,
                                          engine="transformers" if gen.engine == "openai" else gen.engine,
                                          engine_options=options)
    try:
        result = distill(prompts, policy, teacher, settings, judge=judge,
                         answer_max_new_tokens=settings.answer_max_new_tokens or gen.max_new_tokens,
                         temperature=gen.temperature, top_p=gen.top_p, seed=seed, teacher_source=source,
                         progress=progress)
    finally:
        _close(teacher)
    stats = {**base.stats, **_prefixed("distill", result.stats)}
    guidelines = result.guidelines.to_dict(orient="records")
    return StrategyData(pairs=base.pairs, sft=result.sft, stats=stats,
                        record={"teacher": source, "guidelines": guidelines})


def _prefixed(prefix: str, stats: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": float(value) for key, value in stats.items()}


def _typed(frame, columns: list[str]):
    return frame[columns + PROVENANCE] if len(frame) else frame.reindex(columns=columns + PROVENANCE)


def _close(resource) -> None:
    from flywheel.generation import close_engine

    close_engine(resource)
