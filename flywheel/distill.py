"""Weak-to-strong distillation (METEOR-style): the weak student says what a good answer needs, a stronger teacher
answers with that guideline, and the student learns the teacher's answers by SFT.

Per prompt:

1. the student (the round's policy) writes a short guideline, greedily: the requirements a good answer must meet;
2. the teacher answers the request with the guideline beside it (one sample);
3. the answer becomes an SFT row for the ORIGINAL prompt, without the guideline: at inference there is none, so the
   student must learn to produce the answer from the request alone.

Each phase is one ``Engine.generate`` call over all prompts, so engines batch (or parallelize) the whole round.
Later rounds go on with the student's own data (another strategy); this module only builds one round's rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.generation import Engine, EngineError, Progress, SamplingParams, user_request
from flywheel.prompts import Prompt

if TYPE_CHECKING:
    import pandas as pd

    from flywheel.config import DistillConfig, TeacherConfig
    from flywheel.judges import Judge

ORIGIN = "distill:teacher"
GUIDELINE_COLUMNS = ["prompt_id", "guideline", "n_tokens"]
# ``ended``: the teacher's answer finished its turn, or the token limit cut it off (training.open_cut_off_targets).
EXTRA_COLUMNS = ["origin", "judge", "guideline", "teacher", "ended"]

GUIDELINE_TEMPLATE = """Here is a user's request:

{prompt}

Do not answer it. Instead, list the requirements a good answer must meet, briefly: a few short points."""

TEACHER_TEMPLATE = """{prompt}

Guideline from a reviewer:
{guideline}

Answer the request. Follow the guideline where it helps, and do not mention it."""

NO_GUIDELINE = "(none)"


class DistillError(RuntimeError):
    """Distillation cannot run: the single-line message names the model (folder or endpoint) and the problem."""


@dataclass(frozen=True)
class DistillResult:
    sft: pd.DataFrame  # SFT_COLUMNS + EXTRA_COLUMNS
    guidelines: pd.DataFrame  # prompt_id, guideline, n_tokens: every guideline the student wrote
    stats: dict[str, float]


def guideline_request_text(prompt: str) -> str:
    return GUIDELINE_TEMPLATE.format(prompt=prompt.strip())


def teacher_request_text(prompt: str, guideline: str) -> str:
    return TEACHER_TEMPLATE.format(prompt=prompt.strip(), guideline=guideline.strip() or NO_GUIDELINE)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def make_teacher_engine(teacher: TeacherConfig, base_dir: Path, device: str, batch_size: int,
                        engine: str = "transformers",
                        engine_options: Mapping[str, Any] | None = None) -> tuple[Engine, str]:
    """The teacher as an Engine and a source string naming it.

    With ``teacher.base_url`` it is the OpenAI-compatible endpoint (source ``"URL model NAME"``); otherwise
    ``teacher.model`` is a local folder (relative paths resolved against ``base_dir``; source: the folder) run on
    ``engine`` — a local engine, so ``"openai"`` (the policy's server, which serves only the policy) falls back to
    transformers. ``engine_options``: extra ``make_engine`` settings of the local engines (ctranslate2's).
    A missing folder, an unloadable model or an unusable endpoint is a one-line ``DistillError``.
    """
    from flywheel.config import _looks_like_path, resolve
    from flywheel.generation import make_engine
    from flywheel.models import ModelError

    if teacher.base_url is not None:
        source = f"{teacher.base_url} model {teacher.model}"
        try:
            return make_engine("openai", Path(), device, batch_size, endpoint=teacher), source
        except (EngineError, ValueError) as error:
            raise DistillError(f"distill teacher ({source}): {_one_line(error)}") from error
    folder = resolve(teacher.model, base_dir) if _looks_like_path(teacher.model) else Path(teacher.model)
    if _looks_like_path(teacher.model) and not folder.is_dir():
        # Checked here: the tokenizer loads before the model, and its error for a missing path is a hub lookup.
        raise DistillError(f"distill teacher ({folder}): model folder not found")
    local_engine = "transformers" if engine == "openai" else engine
    try:
        loaded = make_engine(local_engine, folder, device, batch_size, **dict(engine_options or {}))
    except (OSError, ValueError, ModelError, EngineError) as error:
        raise DistillError(f"distill teacher ({folder}): cannot load the model: {_one_line(error)}") from error
    return loaded, str(folder)


def _generate(engine: Engine, role: str, requests: list, params: SamplingParams,
              progress: Progress | None) -> list[Any]:
    """One completion per request, in request order; an engine failure or a missing answer is a DistillError."""
    try:
        completions = engine.generate(requests, 1, params, progress)
    except EngineError as error:
        raise DistillError(f"distill {role}: {_one_line(error)}") from error
    by_request = {c.request_index: c for c in completions if c.sample_index == 0}
    missing = [i for i in range(len(requests)) if i not in by_request]
    if missing:
        raise DistillError(f"distill {role}: no answer for {len(missing)} of {len(requests)} requests "
                           f"(first: request {missing[0]})")
    return [by_request[i] for i in range(len(requests))]


def distill(prompts: Sequence[Prompt], student: Engine, teacher: Engine, options: DistillConfig, *,
            judge: Judge | None = None, answer_max_new_tokens: int, temperature: float, top_p: float, seed: int,
            teacher_source: str = "", progress: Progress | None = None) -> DistillResult:
    """The round's distillation rows: student guidelines, teacher answers, SFT rows on the original prompts.

    Guidelines are greedy (temperature 0, ``options.guideline_max_new_tokens``), one student ``generate`` call;
    answers are one teacher ``generate`` call, one sample per prompt, at ``temperature``/``top_p``/``seed``.
    ``answer_max_new_tokens`` is the caller's resolution of ``options.answer_max_new_tokens`` (None there means
    ``generation.max_new_tokens``). ``progress`` gets the generations finished, over both phases (2 per prompt).

    Rows: ``score`` is the judge's score (1.0 without a judge). Empty teacher answers are never kept. With
    ``options.require_pass`` and a judge, only answers the judge accepts (``passed is True``; no verdict is not a
    pass) are kept; without a judge there is nothing to pass, so require_pass keeps every non-empty answer.

    stats: prompts, answers (teacher answers asked for), empty_answers, passed (non-empty answers the judge accepted;
    every non-empty one without a judge), kept, pass_rate (passed / answers), mean_guideline_tokens.
    """
    import pandas as pd

    from flywheel.dataset import SFT_COLUMNS

    ids = [p.id for p in prompts]
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise DistillError(f"distill: duplicate prompt id {duplicates[0]!r} (row ids must be unique)")
    if answer_max_new_tokens < 1:
        raise DistillError(f"distill: answer_max_new_tokens must be >= 1, got {answer_max_new_tokens}")

    guideline_params = SamplingParams(max_new_tokens=options.guideline_max_new_tokens, temperature=0.0, top_p=1.0,
                                      seed=seed)
    guides = _generate(student, "student", [user_request(guideline_request_text(p.prompt)) for p in prompts],
                       guideline_params, progress) if prompts else []
    guideline_texts = [c.text.strip() for c in guides]

    answer_params = SamplingParams(max_new_tokens=answer_max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed)
    teacher_role = f"teacher ({teacher_source})" if teacher_source else "teacher"
    answers = _generate(teacher, teacher_role,
                        [user_request(teacher_request_text(p.prompt, g)) for p, g in zip(prompts, guideline_texts)],
                        answer_params, progress) if prompts else []
    answer_texts = [c.text.strip() for c in answers]

    # Only non-empty answers are judged: an empty one is dropped whatever a judge would say.
    judged = [i for i, text in enumerate(answer_texts) if text]
    verdicts = dict(zip(judged, judge.judge([(prompts[i], answer_texts[i]) for i in judged]))) if judge else {}
    if judge is not None and len(verdicts) != len(judged):
        raise DistillError(f"distill: judge {judge.name} gave {len(verdicts)} verdicts for {len(judged)} answers")

    rows, passed = [], 0
    for i in judged:
        verdict = verdicts.get(i)
        accepted = verdict is None or verdict.passed is True
        passed += accepted
        if options.require_pass and not accepted:
            continue
        prompt = prompts[i]
        rows.append({
            "row_id": f"{prompt.id}-distill", "prompt_id": prompt.id, "prompt": prompt.prompt,
            "completion": answer_texts[i], "score": float(verdict.score) if verdict else 1.0,
            "origin": ORIGIN, "judge": judge.name if judge else "none", "guideline": guideline_texts[i],
            "teacher": teacher_source, "ended": bool(answers[i].finished),
        })
    sft = pd.DataFrame(rows, columns=SFT_COLUMNS + EXTRA_COLUMNS).astype({"score": "float64", "ended": bool})
    guidelines = pd.DataFrame(
        {"prompt_id": ids, "guideline": guideline_texts, "n_tokens": [int(c.n_tokens) for c in guides]},
        columns=GUIDELINE_COLUMNS,
    ).astype({"n_tokens": "int64"})
    n = len(prompts)
    stats = {
        "prompts": float(n),
        "answers": float(len(answers)),
        "empty_answers": float(len(answers) - len(judged)),
        "passed": float(passed),
        "kept": float(len(sft)),
        "pass_rate": passed / n if n else 0.0,
        "mean_guideline_tokens": float(guidelines["n_tokens"].mean()) if n else 0.0,
    }
    return DistillResult(sft=sft, guidelines=guidelines, stats=stats)
