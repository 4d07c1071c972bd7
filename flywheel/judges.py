"""Judges: (prompt, response) -> verdict with a score, pass/fail (or no verdict) and a critique in words.

Every judge has one signature, ``judge(items) -> list[JudgeVerdict]`` over a batch of (prompt, response) pairs, so
LLM judges can batch their critiques through one ``flywheel.generation.Engine`` call.

* ``VerifierJudge`` (``verifier``): the programmatic instruction checks of ``flywheel.verifiers``; its critique
  names the failed constraints in words. A prompt without constraints gets no verdict from it.
* ``HumanJudge`` (``human``): the verdicts a reviewer gave at the review gate (rows kept or dropped).
* ``LLMJudge`` (``self``: the policy judges its own answers; ``teacher``: another model, a local folder or an
  OpenAI-compatible endpoint): the model writes a short critique that must end with a line ``VERDICT: PASS`` or
  ``VERDICT: FAIL``; ``votes`` critiques are sampled per row and the majority decides, a tie (or no readable
  verdict at all) gives no verdict (``passed=None``).

How judges combine over a round's samples (verifier first, the LLM judge for what it cannot check, agreement) is
``flywheel.feedback.judge_table``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from flywheel.generation import Engine, EngineError, SamplingParams, user_request
from flywheel.prompts import Prompt
from flywheel.verifiers import echoed_instruction, verify

if TYPE_CHECKING:
    from flywheel.config import FlywheelConfig
    from flywheel.review import ReviewDecision

Item = tuple[Prompt, str]


class JudgeVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    score: float = Field(ge=0.0, le=1.0)
    passed: bool | None  # None: no verdict (the judge could not decide, or its votes tied)
    critique: str
    judge: str


class JudgeError(RuntimeError):
    """A judge failed or gave too few verdicts; the single-line message names the judge and its source."""


class Judge(Protocol):
    name: str
    source: str  # what judged: "programmatic checks", a model folder, an endpoint URL and model

    def judge(self, items: Sequence[Item]) -> list[JudgeVerdict]: ...


# --- verifier ---------------------------------------------------------------------------------------------------

class VerifierJudge:
    """The programmatic checks. ``checks`` gives the per-constraint results the samples table records.
    ``echo_ngram``: a response that copies its instructions' wording (``flywheel.verifiers.echoed_instruction``)
    fails with score 0 whatever its checks say, so it is never a training target and is the rejected side of a
    pair. Evaluation leaves it unset: held-out accuracy stays the plain instruction checks."""

    name = "verifier"
    source = "programmatic checks"

    def __init__(self, strict: bool = True, echo_ngram: int | None = None):
        self.strict = strict
        self.echo_ngram = echo_ngram

    def judge(self, items: Sequence[Item]) -> list[JudgeVerdict]:
        return [verdict for verdict, _ in self.judge_with_checks(items)]

    def judge_with_checks(self, items: Sequence[Item]) -> list[tuple[JudgeVerdict, list[bool]]]:
        return [self._one(prompt, response) for prompt, response in items]

    def _one(self, prompt: Prompt, response: str) -> tuple[JudgeVerdict, list[bool]]:
        if not prompt.constraints:
            return JudgeVerdict(score=0.0, passed=None, judge=self.name,
                                critique="No verifiable constraint: the verifier cannot judge this prompt."), []
        result = verify(prompt.constraints, response, strict=self.strict)
        echo = (None if self.echo_ngram is None
                else echoed_instruction(prompt.constraints, response, ngram=self.echo_ngram))
        if echo is not None:
            return JudgeVerdict(score=0.0, passed=False, judge=self.name,
                                critique=f"Copies its instructions instead of following them: {echo}."), \
                list(result.checks)
        failed = [c.describe() for c, ok in zip(prompt.constraints, result.checks) if not ok]
        total = len(result.checks)
        if not failed:
            critique = f"Meets all {total} constraint{'s' if total > 1 else ''}."
        else:
            blank = "The response is empty. " if not response.strip() else ""
            critique = f"{blank}Fails {len(failed)} of {total}: " + " | ".join(failed)
        return JudgeVerdict(score=result.score, passed=result.passed, critique=critique, judge=self.name), \
            list(result.checks)


# --- human -------------------------------------------------------------------------------------------------------

class HumanJudge:
    """Verdicts a reviewer gave at the review gate (``flywheel.review.ReviewDecision``), keyed by prompt and answer.

    A row the reviewer was shown and kept in an approved round passes; a row they dropped fails (for a pair, its
    chosen answer); anything they did not see, and any automatic decision, gives no verdict.
    """

    name = "human"

    def __init__(self, verdicts: Mapping[tuple[str, str], bool], reviewer: str, notes: str = ""):
        self.verdicts = {(prompt_id, text.strip()): ok for (prompt_id, text), ok in verdicts.items()}
        self.source = f"review by {reviewer}"
        self.notes = notes

    @classmethod
    def from_review(cls, decision: ReviewDecision, rows: Sequence[Mapping[str, Any]]) -> HumanJudge:
        """``rows``: the reviewed table's rows (samples, SFT or pairs), as dicts with row_id and prompt_id."""
        verdicts: dict[tuple[str, str], bool] = {}
        if decision.mode == "human":
            dropped, shown = set(decision.dropped_ids), set(decision.sample_ids)
            for row in rows:
                column = next((c for c in ("response", "completion", "chosen") if c in row), None)
                if column is None or row["row_id"] not in shown | dropped:
                    continue
                if row["row_id"] in dropped or decision.approved:
                    verdicts[(row["prompt_id"], str(row[column]))] = row["row_id"] not in dropped
        return cls(verdicts, decision.reviewer, decision.notes)

    def judge(self, items: Sequence[Item]) -> list[JudgeVerdict]:
        verdicts = []
        for prompt, response in items:
            ok = self.verdicts.get((prompt.id, response.strip()))
            if ok is None:
                verdicts.append(JudgeVerdict(score=0.0, passed=None, critique="Not reviewed.", judge=self.name))
                continue
            said = f"{'Kept' if ok else 'Dropped'} in {self.source}" + (f": {self.notes}" if self.notes else ".")
            verdicts.append(JudgeVerdict(score=1.0 if ok else 0.0, passed=ok, critique=said, judge=self.name))
        return verdicts


# --- LLM judges: prompt, parser, vote -----------------------------------------------------------------------------

CRITIQUE_TEMPLATE = """You are a strict grader. Check whether the RESPONSE follows every requirement of the REQUEST.

REQUEST:
{prompt}

REQUIREMENTS:
{requirements}

RESPONSE:
{response}

Write a short critique (at most three sentences) that names every requirement the response breaks, or says that it \
meets them all. Then end with one final line that is exactly "VERDICT: PASS" if the response meets every \
requirement, or "VERDICT: FAIL" if it does not."""


def critique_prompt(prompt: Prompt, response: str) -> str:
    """The LLM judge's request: the prompt, its requirements (its constraints in words), the response."""
    requirements = [f"- {c.describe()}" for c in prompt.constraints] or ["- Everything the request asks for."]
    return CRITIQUE_TEMPLATE.format(prompt=prompt.prompt.strip(), requirements="\n".join(requirements),
                                    response=response.strip() or "(empty)")


# The final line, once markdown decoration (**, __, `, #, >, list marks) is stripped: "verdict", a separator, the
# decision, optional closing punctuation. Case does not matter; anything else on the line means no verdict.
_VERDICT_LINE = re.compile(r"^verdict\s*[:=\-]?\s*(pass|fail)\s*[.!]?$", re.IGNORECASE)
_DECORATION = re.compile(r"[*_`#>\[\]]")


class Vote(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool | None
    critique: str


def final_line(text: str) -> tuple[str, list[str]]:
    """A model's reply split into its last non-empty line, markdown decoration stripped (where judges ask for their
    decision), and the lines before it; ("", []) for an empty reply."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "", []
    return _DECORATION.sub("", lines[-1]).strip().lstrip("-+ ").strip(), lines[:-1]


def parse_verdict(text: str) -> Vote:
    """Strict about where the verdict is (the last non-empty line), tolerant of case and markdown around it.

    A verdict anywhere but the last line (say, followed by more text) is no verdict: the model did not finish as
    asked, and a verdict in the middle of a ramble is not trusted.
    """
    last, before = final_line(text)
    if not last:
        return Vote(passed=None, critique="")
    match = _VERDICT_LINE.match(last)
    if match is None:
        return Vote(passed=None, critique=text.strip())
    return Vote(passed=match.group(1).lower() == "pass", critique="\n".join(before).strip())


def majority(votes: Sequence[Vote], judge: str) -> JudgeVerdict:
    """Majority of the votes that hold a verdict; a tie, or no verdict in any vote, gives no verdict.

    The score is the share of PASS among the votes with a verdict (0 when none has one); the critique is the first
    critique that sides with the majority.
    """
    passes = sum(1 for vote in votes if vote.passed is True)
    fails = sum(1 for vote in votes if vote.passed is False)
    unreadable = len(votes) - passes - fails
    score = passes / (passes + fails) if passes + fails else 0.0
    if passes == fails:
        reason = "no vote ended with a VERDICT line" if passes == 0 else f"tie: {passes} PASS, {fails} FAIL"
        extra = f", {unreadable} without a verdict" if unreadable and passes else ""
        return JudgeVerdict(score=score, passed=None, critique=f"No verdict ({reason}{extra}).", judge=judge)
    passed = passes > fails
    critique = next((vote.critique for vote in votes if vote.passed is passed), "")
    if len(votes) > 1:
        critique = f"[{passes} PASS, {fails} FAIL of {len(votes)} votes] {critique}".strip()
    return JudgeVerdict(score=score, passed=passed, critique=critique, judge=judge)


class LLMJudge:
    """A model judges through an Engine: one critique request per row, ``votes`` samples each, majority vote."""

    def __init__(self, engine: Engine, name: str, source: str, *, votes: int = 1, temperature: float = 0.7,
                 max_new_tokens: int = 256, seed: int = 0):
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        self.engine = engine
        self.name = name
        self.source = source
        self.votes = votes
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if votes > 1 else 0.0,
                                     top_p=1.0, seed=seed)

    def judge(self, items: Sequence[Item]) -> list[JudgeVerdict]:
        if not items:
            return []
        requests = [user_request(critique_prompt(prompt, response)) for prompt, response in items]
        try:
            completions = self.engine.generate(requests, self.votes, self.params)
        except EngineError as error:
            raise JudgeError(f"{self.name} judge ({self.source}): {error}") from error
        texts: list[list[str]] = [[] for _ in items]
        for completion in completions:
            texts[completion.request_index].append(completion.text)
        return [majority([parse_verdict(text) for text in row], self.name) for row in texts]

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def build_llm_judge(config: FlywheelConfig, champion_dir: Path, base_dir: Path, device: str = "cpu",
                    engine_options: Mapping[str, Any] | None = None,
                    reward_model_dir: Path | None = None) -> Judge | None:
    """The round's judge besides the verifier: ``self`` (the champion, through the generation engine), ``teacher``
    (an OpenAI-compatible endpoint, or a local folder through a local engine) or ``reward_model`` (the reward model
    in ``reward_model_dir``); None without one. ``engine_options``: extra ``make_engine`` settings of the local
    engines (the ctranslate2 engine's)."""
    from flywheel.config import _looks_like_path, resolve
    from flywheel.generation import make_engine

    feedback, generation = config.feedback, config.generation
    if "reward_model" in feedback.judges:
        if reward_model_dir is None:
            raise JudgeError("reward_model judge: no reward model was trained for this round")
        from flywheel.reward import RewardModelJudge

        return RewardModelJudge(reward_model_dir, threshold=feedback.reward_threshold, device=device)
    local_options = dict(engine_options or {})
    options = {"votes": feedback.votes, "temperature": feedback.judge_temperature,
               "max_new_tokens": feedback.judge_max_new_tokens, "seed": config.seed}
    if "self" in feedback.judges:
        if generation.engine == "openai" and generation.openai is not None:
            source = f"{generation.openai.base_url} model {generation.openai.model}"
        else:
            source = str(champion_dir)
        engine = make_engine(generation.engine, champion_dir, device, generation.batch_size,
                             endpoint=generation.openai, **local_options)
        return LLMJudge(engine, "self", source, **options)
    teacher = feedback.teacher
    if "teacher" in feedback.judges and teacher is not None:
        if teacher.base_url is not None:
            engine = make_engine("openai", Path(), device, generation.batch_size, endpoint=teacher)
            return LLMJudge(engine, "teacher", f"{teacher.base_url} model {teacher.model}", **options)
        folder = resolve(teacher.model, base_dir) if _looks_like_path(teacher.model) else Path(teacher.model)
        # A local teacher runs on the generation engine when that one is local; the endpoint serves only its model.
        local_engine = "transformers" if generation.engine == "openai" else generation.engine
        from flywheel.models import ModelError

        try:
            engine = make_engine(local_engine, folder, device, generation.batch_size, **local_options)
        except (OSError, ValueError, ModelError) as error:
            message = " ".join(str(error).split())
            raise JudgeError(f"teacher judge ({folder}): cannot load the model: {message}") from error
        return LLMJudge(engine, "teacher", str(folder), **options)
    return None
