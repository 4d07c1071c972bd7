"""Open-ended win rate: the candidate against the champion on prompts no verifier can check, decided by an LLM judge
that compares the two answers side by side.

The held-out set measures instruction following with programmatic checks; it says nothing about answers to plain
requests ("explain...", "write..."), where a round could make the model worse without any check noticing. Here both
models answer the same open-ended prompts greedily, and a judge (``self``: the champion; ``teacher``: the recipe's
teacher, a local folder or an OpenAI-compatible endpoint) is asked which answer is better, **twice, with the order
swapped**: small models prefer whichever answer comes first (or second) regardless of content, so a win counts only
when the judge picks the same answer in both orders; a split, or a reply without a readable ``WINNER:`` line, is a
tie. Win rate = (wins + ties / 2) / prompts, as for the verifier's win rate.

Prompts: ``builtin`` (the list below) or a JSONL file of ``{"id": ..., "prompt": ...}`` objects.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.generation import Engine, SamplingParams, user_request

BUILTIN_OPEN_ENDED = (
    "Explain why the sky is blue to a ten-year-old.",
    "Give three practical tips for keeping a small vegetable garden healthy.",
    "What are the main differences between a virus and a bacterium?",
    "Write a short, friendly email inviting a colleague to a team lunch on Friday.",
    "Describe how a bicycle gear system helps a rider climb hills.",
    "Why do we have seasons on Earth?",
    "Suggest a simple weekly routine for someone who wants to start running.",
    "Explain what a budget is and why it helps with personal finances.",
    "Write a four-line poem about the ocean at night.",
    "How does a refrigerator keep food cold?",
    "What should someone pack for a two-day hiking trip?",
    "Explain the difference between weather and climate.",
    "Give advice to a student who feels nervous before an exam.",
    "Describe the water cycle in a few sentences.",
    "What are the benefits of reading books regularly?",
    "Explain how to make a cup of tea, step by step.",
    "Why is sleep important for health?",
    "Write a short thank-you note to a neighbour who watered your plants.",
    "What is photosynthesis, in simple terms?",
    "Compare trains and planes for a 500 km trip.",
    "How can someone reduce the amount of plastic they use at home?",
    "Explain what a computer's memory does.",
    "Describe a good way to learn new vocabulary in a foreign language.",
    "What causes thunder and lightning?",
    "Give a short summary of why recycling matters.",
    "Explain how vaccines help the body fight disease.",
    "Write a two-sentence story about a lost umbrella.",
    "What are some ways to stay focused while working from home?",
    "Why do leaves change colour in autumn?",
    "Explain what an index in a book is for.",
    "How does a compass work?",
    "Suggest three board games for a family evening and say why.",
    "Explain why exercise is good for the heart.",
    "Describe how bread rises.",
    "What makes a good team meeting?",
    "Why is it a good idea to back up files on a computer?",
    "Explain the idea of supply and demand with an everyday example.",
    "How should someone prepare for a job interview?",
    "Describe the moon's phases briefly.",
    "What are the pros and cons of living in a big city?",
)


class OpenEndedPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=20_000)


class OpenEndedError(ValueError):
    """Unusable open-ended prompts or judge; the single-line message names the source."""


Winner = Literal["A", "B"]


class PairVerdict(BaseModel):
    """One prompt's comparison: what the judge said with the candidate first, and with the champion first."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt_id: str
    candidate_first: Winner | None  # "A": the candidate's answer (shown first) won
    champion_first: Winner | None  # "A": the champion's answer (shown first) won
    outcome: Literal["win", "loss", "tie"]


class OpenEndedResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prompts: int
    wins: int
    losses: int
    ties: int
    win_rate: float  # (wins + ties / 2) / prompts
    judge: str  # self or teacher
    source: str  # the judging model: a folder, or an endpoint URL and model
    prompt_source: str  # builtin, or the JSONL file


def load_open_ended(source: str, limit: int, base_dir: Path | None = None) -> list[OpenEndedPrompt]:
    """``builtin`` or a JSONL file (``id``, ``prompt`` per line); the first ``limit`` prompts."""
    if limit < 1:
        raise OpenEndedError(f"open-ended prompts: limit must be at least 1, got {limit}")
    if source == "builtin":
        prompts = [OpenEndedPrompt(id=f"open-{hashlib.sha256(text.encode()).hexdigest()[:10]}", prompt=text)
                   for text in BUILTIN_OPEN_ENDED]
        return prompts[:limit]
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise OpenEndedError(f"{path}: open-ended prompt file not found")
    prompts: list[OpenEndedPrompt] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompts.append(OpenEndedPrompt.model_validate(json.loads(line)))
        except ValueError as error:  # JSON and validation errors alike
            detail = " ".join(str(error).split())[:200]
            raise OpenEndedError(f"{path}, line {number}: not an open-ended prompt "
                                 f"({{\"id\": ..., \"prompt\": ...}}): {detail}") from error
    if not prompts:
        raise OpenEndedError(f"{path}: no open-ended prompts")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise OpenEndedError(f"{path}: duplicate prompt ids")
    return prompts[:limit]


COMPARE_TEMPLATE = """You are comparing two answers to the same request.

REQUEST:
{prompt}

ANSWER A:
{first}

ANSWER B:
{second}

Which answer is more helpful, correct and clear for this request? Explain in at most two sentences, then end with \
one final line that is exactly "WINNER: A" or "WINNER: B"."""

_WINNER_LINE = re.compile(r"^winner\s*[:=\-]?\s*(?:answer\s+)?([ab])\s*[.!]?$", re.IGNORECASE)


def compare_prompt(prompt: str, first: str, second: str) -> str:
    return COMPARE_TEMPLATE.format(prompt=prompt.strip(), first=first.strip() or "(empty)",
                                   second=second.strip() or "(empty)")


def parse_winner(text: str) -> Winner | None:
    """The winner on the reply's last non-empty line (case and markdown tolerated); None if it is not there."""
    from flywheel.judges import final_line

    match = _WINNER_LINE.match(final_line(text)[0])
    return match.group(1).upper() if match else None  # type: ignore[return-value]


def outcome(candidate_first: Winner | None, champion_first: Winner | None) -> Literal["win", "loss", "tie"]:
    """A win needs the candidate picked in both orders (A when it is shown first, B when second); a loss likewise."""
    if candidate_first == "A" and champion_first == "B":
        return "win"
    if candidate_first == "B" and champion_first == "A":
        return "loss"
    return "tie"


def judge_pairs(engine: Engine, prompts: Sequence[OpenEndedPrompt], candidate: Sequence[str],
                champion: Sequence[str], *, max_new_tokens: int = 192) -> list[PairVerdict]:
    """Both orders of every (candidate, champion) pair through one batched, greedy ``engine.generate`` call."""
    if not (len(prompts) == len(candidate) == len(champion)):
        raise ValueError("one candidate and one champion answer per prompt")
    requests = []
    for prompt, mine, theirs in zip(prompts, candidate, champion):
        requests.append(user_request(compare_prompt(prompt.prompt, mine, theirs)))
        requests.append(user_request(compare_prompt(prompt.prompt, theirs, mine)))
    completions = engine.generate(requests, 1, SamplingParams(max_new_tokens=max_new_tokens))
    texts = {c.request_index: c.text for c in completions}
    verdicts = []
    for n, prompt in enumerate(prompts):
        first, second = parse_winner(texts.get(2 * n, "")), parse_winner(texts.get(2 * n + 1, ""))
        verdicts.append(PairVerdict(prompt_id=prompt.id, candidate_first=first, champion_first=second,
                                    outcome=outcome(first, second)))
    return verdicts


def summarize_pairs(verdicts: Sequence[PairVerdict], judge: str, source: str, prompt_source: str) -> OpenEndedResult:
    if not verdicts:
        raise OpenEndedError("no open-ended comparisons to summarize")
    wins = sum(v.outcome == "win" for v in verdicts)
    losses = sum(v.outcome == "loss" for v in verdicts)
    ties = len(verdicts) - wins - losses
    return OpenEndedResult(prompts=len(verdicts), wins=wins, losses=losses, ties=ties,
                           win_rate=(wins + 0.5 * ties) / len(verdicts), judge=judge, source=source,
                           prompt_source=prompt_source)


def answer(engine: Engine, prompts: Sequence[OpenEndedPrompt], max_new_tokens: int, progress=None) -> list[str]:
    """Greedy answers, in prompt order."""
    completions = engine.generate([user_request(p.prompt) for p in prompts], 1,
                                  SamplingParams(max_new_tokens=max_new_tokens), progress)
    by_index = {c.request_index: c.text for c in completions}
    return [by_index[n] for n in range(len(prompts))]

