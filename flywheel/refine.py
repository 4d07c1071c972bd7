"""Refinement strategies: turn the policy's FAILED answers into better training data.

* ``self_refine`` (SELF, Lu et al. 2023): the policy critiques its own failed answer in words and rewrites it; a
  judge scores the rewrites. Accepted rewrites become SFT rows, rewrites that beat the original become preference
  pairs (refined, original), and with ``meta_skill`` the critiques and rewrites themselves become SFT rows so the
  model also learns to critique and to refine.
* ``spar_search`` (SPaR, Cheng et al. 2024): breadth-first tree search over MINIMAL refinements of a failed
  answer, guided by the judge's critique, until the judge accepts one. The pair (refined, original) then differs
  only in what the instruction cares about, which is what makes it a clean DPO signal. The refiner's own data
  (successful refinements, judgements) are SFT rows.
* ``refine_answers``: inference-time self-refinement (critique, then rewrite; no judge) for ``flywheel generate``.

Both strategies return only the rows they make (``RefineResult``); merging them with the plain best-of-n rows is
the round's job. Every engine call batches all answers of one step, and every judge call all rewrites of one step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel.dataset import PAIR_COLUMNS, SFT_COLUMNS
from flywheel.generation import Completion, Engine, Progress, SamplingParams, user_request
from flywheel.judges import Judge, JudgeError, JudgeVerdict, critique_prompt, parse_verdict
from flywheel.prompts import Prompt

if TYPE_CHECKING:
    import pandas as pd

    from flywheel.config import SelfRefineConfig, SparConfig

REFINE_PAIR_COLUMNS = [*PAIR_COLUMNS, "origin", "judge"]
# ``ended``: the target finished its turn, or the token limit cut it off (``training.open_cut_off_targets``).
REFINE_SFT_COLUMNS = [*SFT_COLUMNS, "origin", "judge", "ended"]
# Columns of the judged samples table (flywheel.feedback.SAMPLE_COLUMNS) the strategies read.
NEEDED_SAMPLE_COLUMNS = ("prompt_id", "sample_index", "response", "score", "verdict", "critique", "judge")

# SELF's rewrite request. The model sees its own critique; it must answer with the corrected answer alone, because
# whatever it writes becomes an SFT completion and the chosen side of a pair verbatim.
REWRITE_TEMPLATE = """Improve your answer to a request, using a critique of it.

REQUEST:
{prompt}

REQUIREMENTS:
{requirements}

YOUR ANSWER:
{response}

CRITIQUE:
{critique}

Rewrite the answer so that it meets every requirement and fixes every problem the critique names. Reply with the \
full corrected answer only: no preamble, no notes, no explanation of the changes."""

# SPaR's refine request: a MINIMAL edit, so the pair (refined, original) differs only where the instruction is
# broken and DPO does not learn unrelated differences (length, style) instead.
SPAR_REFINE_TEMPLATE = """The ANSWER below to the REQUEST breaks some of its requirements; the CRITIQUE says which.

REQUEST:
{prompt}

REQUIREMENTS:
{requirements}

ANSWER:
{response}

CRITIQUE:
{critique}

Make the smallest edit to the ANSWER that fixes what the critique names and keep everything else exactly as it \
is. Reply with the full edited answer only: no preamble, no notes."""

_NO_CRITIQUE = "(no critique)"
# The vote tally LLMJudge puts before a multi-vote critique; a judgement row teaches the critique, not the tally.
_VOTE_TALLY = re.compile(r"^\[\d+ PASS, \d+ FAIL of \d+ votes\]\s*")


@dataclass(frozen=True)
class RefineResult:
    pairs: pd.DataFrame  # REFINE_PAIR_COLUMNS; at most one pair per prompt_id; chosen = refined, rejected = original
    sft: pd.DataFrame  # REFINE_SFT_COLUMNS
    stats: dict[str, float] = field(default_factory=dict)


def _requirements(prompt: Prompt) -> str:
    return "\n".join(f"- {c.describe()}" for c in prompt.constraints) or "- Everything the request asks for."


def rewrite_prompt(prompt: Prompt, response: str, critique: str) -> str:
    """SELF's rewrite request for one answer and its critique."""
    return REWRITE_TEMPLATE.format(prompt=prompt.prompt.strip(), requirements=_requirements(prompt),
                                   response=response.strip() or "(empty)", critique=critique.strip() or _NO_CRITIQUE)


def spar_refine_prompt(prompt: Prompt, response: str, critique: str) -> str:
    """SPaR's minimal-edit refine request for one node and the judge's critique of it."""
    return SPAR_REFINE_TEMPLATE.format(prompt=prompt.prompt.strip(), requirements=_requirements(prompt),
                                       response=response.strip() or "(empty)",
                                       critique=critique.strip() or _NO_CRITIQUE)


def with_verdict_line(critique: str, passed: bool) -> str:
    """A critique as the LLM judge must write it: the text, then a final ``VERDICT:`` line."""
    body = _VOTE_TALLY.sub("", critique.strip())
    line = f"VERDICT: {'PASS' if passed else 'FAIL'}"
    return f"{body}\n{line}" if body else line


# --- shared helpers ------------------------------------------------------------------------------------------------

def _failed_answers(prompts: Sequence[Prompt], samples, max_answers: int) -> list[tuple[Prompt, dict[str, Any]]]:
    """The worst-scored failed sample of each prompt, worst first (ties: prompt id), at most ``max_answers``."""
    missing = [c for c in NEEDED_SAMPLE_COLUMNS if c not in samples.columns]
    if missing:
        raise ValueError(f"samples table lacks column(s) {', '.join(missing)}")
    if max_answers < 1:
        raise ValueError(f"max_answers must be >= 1, got {max_answers}")
    by_id = {p.id: p for p in prompts}
    failed = samples[samples["verdict"] == "fail"]
    unknown = sorted(set(failed["prompt_id"]) - set(by_id))
    if unknown:
        raise ValueError(f"samples name prompt id(s) not among the prompts given: {', '.join(map(str, unknown[:5]))}")
    worst = (failed.sort_values(["score", "prompt_id", "sample_index"], kind="stable")
             .drop_duplicates("prompt_id", keep="first")
             .head(max_answers))
    return [(by_id[row["prompt_id"]], row) for row in worst.to_dict("records")]


def _regrouped(completions: Sequence[Completion], requests: int, samples: int) -> list[list[Completion]]:
    """Completions regrouped per request, in sample order; a backend that answers too few fails loudly."""
    grouped: list[list[Completion]] = [[] for _ in range(requests)]
    for completion in sorted(completions, key=lambda c: (c.request_index, c.sample_index)):
        grouped[completion.request_index].append(completion)
    short = [i for i, row in enumerate(grouped) if len(row) != samples]
    if short:
        raise ValueError(f"engine returned {len(grouped[short[0]])} completions for request {short[0]}, "
                         f"expected {samples}")
    return grouped


def _texts(completions: Sequence[Completion], requests: int, samples: int) -> list[list[str]]:
    return [[c.text.strip() for c in row] for row in _regrouped(completions, requests, samples)]


def _judge(judge: Judge, items: list[tuple[Prompt, str]]) -> list[JudgeVerdict]:
    if not items:
        return []
    verdicts = judge.judge(items)
    if len(verdicts) != len(items):
        raise JudgeError(f"{judge.name} judge ({judge.source}): returned {len(verdicts)} verdicts "
                         f"for {len(items)} rows")
    return verdicts


def _frame(rows: list[dict[str, Any]], columns: list[str], floats: Sequence[str], bools: Sequence[str] = ()):
    import pandas as pd

    frame = pd.DataFrame(rows, columns=columns)
    # Empty tables keep the types a filled one has, so callers can concatenate them with best-of-n rows.
    return frame.astype({c: float for c in floats} | {c: bool for c in bools}
                        | {c: str for c in columns if c not in floats and c not in bools})


def _result(pairs: list[dict[str, Any]], sft: list[dict[str, Any]], stats: dict[str, float]) -> RefineResult:
    pair_frame = _frame(pairs, REFINE_PAIR_COLUMNS, ("chosen_score", "rejected_score"))
    sft_frame = _frame(sft, REFINE_SFT_COLUMNS, ("score",), ("ended",))
    for frame, name in ((pair_frame, "pairs"), (sft_frame, "sft")):
        if frame["row_id"].duplicated().any():  # a bug here, not bad input: row ids are built from unique keys
            raise AssertionError(f"duplicate row_id in the {name} table")
    return RefineResult(pairs=pair_frame, sft=sft_frame,
                        stats={**{k: float(v) for k, v in stats.items()},
                               "pairs": float(len(pair_frame)), "sft_rows": float(len(sft_frame))})


# --- SELF ------------------------------------------------------------------------------------------------------------

def self_refine(prompts: Sequence[Prompt], samples, engine: Engine, judge: Judge, options: SelfRefineConfig, *,
                max_new_tokens: int, seed: int = 0, progress: Progress | None = None) -> RefineResult:
    """SELF over the round's judged samples: critique, rewrite and judge the worst failed answer of each prompt.

    The original answer's score and verdict are the samples table's (what the round decided); ``judge`` scores
    the rewrites. Rows: ``self_refine:refined`` (best accepted rewrite, SFT), ``self_refine:pair`` (that rewrite,
    or the best one, when it scores strictly higher than the original), and with ``options.meta_skill``
    ``self_refine:critique`` (only critiques whose verdict equals the judge's on the original) and
    ``self_refine:refinement`` (the rewrite request and an accepted rewrite).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    answers = _failed_answers(prompts, samples, options.max_answers)
    if not answers:
        return _result([], [], {"answers_refined": 0, "rewrites": 0, "refined_passed": 0, "meta_rows": 0,
                                "critique_agreement": 0.0})

    critique_requests = [critique_prompt(prompt, row["response"]) for prompt, row in answers]
    critique_params = SamplingParams(max_new_tokens=options.critique_max_new_tokens,
                                     temperature=options.temperature, seed=seed)
    critiques = [row[0] for row in _texts(
        engine.generate([user_request(text) for text in critique_requests], 1, critique_params, progress),
        len(answers), 1)]
    votes = [parse_verdict(text) for text in critiques]

    # The rewrite sees the critique without its verdict line: the verdict adds nothing to fix.
    rewrite_requests = [rewrite_prompt(prompt, row["response"], vote.critique)
                        for (prompt, row), vote in zip(answers, votes)]
    n = options.refinements
    rewrite_params = SamplingParams(max_new_tokens=options.refine_max_new_tokens or max_new_tokens,
                                    temperature=options.temperature, seed=seed + 1)
    rewritten = _regrouped(engine.generate([user_request(text) for text in rewrite_requests], n, rewrite_params,
                                           progress), len(answers), n)
    rewrites = [[c.text.strip() for c in row] for row in rewritten]
    flat = _judge(judge, [(prompt, text) for (prompt, _), texts in zip(answers, rewrites) for text in texts])
    verdicts = [flat[i * n:(i + 1) * n] for i in range(len(answers))]

    pairs: list[dict[str, Any]] = []
    sft: list[dict[str, Any]] = []
    refined_passed = meta_rows = agreed = 0
    for i, ((prompt, row), texts, judged) in enumerate(zip(answers, rewrites, verdicts)):
        # Best rewrite: accepted first, then score, then the earliest sample.
        best = max(range(n), key=lambda k: (judged[k].passed is True, judged[k].score, -k))
        text, verdict, ended = texts[best], judged[best], rewritten[i][best].finished
        original = row["response"]
        base = {"prompt_id": prompt.id, "prompt": prompt.prompt}
        accepted = verdict.passed is True and bool(text)
        if accepted:
            refined_passed += 1
            sft.append({**base, "row_id": f"{prompt.id}-self_refine-sft", "completion": text,
                        "score": float(verdict.score), "origin": "self_refine:refined", "judge": verdict.judge,
                        "ended": ended})
        if verdict.score > float(row["score"]) and text and text != original.strip():
            pairs.append({**base, "row_id": f"{prompt.id}-self_refine-pair", "chosen": text, "rejected": original,
                          "chosen_score": float(verdict.score), "rejected_score": float(row["score"]),
                          "origin": "self_refine:pair", "judge": verdict.judge})
        # The samples table's verdict on the original is FAIL (only failed answers are refined).
        agrees = votes[i].passed is False
        agreed += agrees
        if options.meta_skill and agrees:
            meta_rows += 1
            sft.append({"prompt_id": prompt.id, "row_id": f"{prompt.id}-self_refine-critique",
                        "prompt": critique_requests[i], "completion": with_verdict_line(votes[i].critique, False),
                        "score": 1.0, "origin": "self_refine:critique", "judge": str(row["judge"]),
                        "ended": True})  # ends on its verdict line, cut off or not
        if options.meta_skill and accepted:
            meta_rows += 1
            sft.append({"prompt_id": prompt.id, "row_id": f"{prompt.id}-self_refine-refinement",
                        "prompt": rewrite_requests[i], "completion": text, "score": float(verdict.score),
                        "origin": "self_refine:refinement", "judge": verdict.judge, "ended": ended})
    return _result(pairs, sft, {"answers_refined": len(answers), "rewrites": len(answers) * n,
                                "refined_passed": refined_passed, "meta_rows": meta_rows,
                                "critique_agreement": agreed / len(answers)})


def refine_answers(prompts: Sequence[Prompt], answers: list[str], engine: Engine, *, rounds: int,
                   params: SamplingParams, progress: Progress | None = None) -> list[str]:
    """Inference-time self-refinement: ``rounds`` times, the model critiques each answer and rewrites it.

    No judge: an answer whose own critique ends with ``VERDICT: PASS`` is kept and not refined further, and an
    empty rewrite keeps the previous answer (a blank is never better than a flawed answer).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    current = list(answers)
    open_ = list(range(len(current)))
    for step in range(rounds):
        if not open_:
            break
        step_params = params.model_copy(update={"seed": params.seed + 2 * step})
        texts = _texts(engine.generate([user_request(critique_prompt(prompts[i], current[i])) for i in open_], 1,
                                       step_params, progress), len(open_), 1)
        votes = {i: parse_verdict(row[0]) for i, row in zip(open_, texts)}
        open_ = [i for i in open_ if votes[i].passed is not True]
        if not open_:
            break
        requests = [user_request(rewrite_prompt(prompts[i], current[i], votes[i].critique)) for i in open_]
        rewrites = _texts(engine.generate(requests, 1, step_params.model_copy(update={"seed": step_params.seed + 1}),
                                          progress), len(open_), 1)
        for i, row in zip(open_, rewrites):
            if row[0]:
                current[i] = row[0]
    return current


# --- SPaR ------------------------------------------------------------------------------------------------------------

@dataclass
class _Node:
    text: str
    critique: str  # the judge's critique: what the next refinement must fix
    value: float  # share of judge samples that pass
    score: float  # mean judge score
    depth: int
    judge: str
    parent: _Node | None = None
    request: str = ""  # the refine request that produced this node (empty for the root)
    ended: bool = True  # the text finished its turn (False: the token limit cut it off)


@dataclass
class _Search:
    prompt: Prompt
    root: _Node
    frontier: list[_Node]
    winner: _Node | None = None


def spar_search(prompts: Sequence[Prompt], samples, engine: Engine, judge: Judge, options: SparConfig, *,
                max_new_tokens: int, seed: int = 0, judge_deterministic: bool = False,
                progress: Progress | None = None) -> RefineResult:
    """SPaR: per prompt, breadth-first search over minimal refinements of its worst failed answer.

    Each depth refines every kept node ``options.breadth`` times (ONE ``engine.generate`` call for all prompts'
    nodes), values each child by the share of ``options.judge_samples`` judge verdicts that pass (one judge call
    for all children; a deterministic judge is asked once), keeps the best ``options.keep`` children, and stops a
    prompt's search at its first depth with a child valued above ``options.threshold`` (the best such child wins).
    Rows: ``spar:pair`` (winner, original), ``spar:refinement`` (the winner's parent's refine request -> winner) and
    ``spar:judgement`` (the root's FAIL and the winner's PASS critiques, only for solved searches so the refiner
    sees as many PASS as FAIL judgements).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    answers = _failed_answers(prompts, samples, options.max_answers)
    searches = [
        _Search(prompt=prompt, root=(root := _Node(text=str(row["response"]), critique=str(row["critique"]),
                                                   value=0.0, score=float(row["score"]), depth=0,
                                                   judge=str(row["judge"]),
                                                   ended=bool(row.get("finished", True)))), frontier=[root])
        for prompt, row in answers
    ]
    votes = 1 if judge_deterministic else options.judge_samples
    params = SamplingParams(max_new_tokens=options.refine_max_new_tokens or max_new_tokens,
                            temperature=options.temperature, seed=seed)
    expanded = generated = 0
    for depth in range(1, options.depth + 1):
        active = [s for s in searches if s.winner is None and s.frontier]
        if not active:
            break
        parents = [(search, node) for search in active for node in search.frontier]
        requests = [spar_refine_prompt(search.prompt, node.text, node.critique) for search, node in parents]
        grouped = _regrouped(engine.generate([user_request(text) for text in requests], options.breadth,
                                             params.model_copy(update={"seed": seed + depth}), progress),
                             len(parents), options.breadth)
        expanded += len(parents)
        # A child that is empty or repeats its parent is no refinement; it is neither judged nor kept.
        children = [(search, _Node(text=text, critique="", value=0.0, score=0.0, depth=depth, judge=judge.name,
                                   parent=node, request=request, ended=completion.finished))
                    for (search, node), request, row in zip(parents, requests, grouped)
                    for completion in row if (text := completion.text.strip()) and text != node.text.strip()]
        generated += len(children)
        # Every child's votes in one judge call: an LLM judge batches (and samples) them in one engine call.
        flat = _judge(judge, [(search.prompt, child.text) for search, child in children for _ in range(votes)])
        for c, (_, child) in enumerate(children):
            verdicts = flat[c * votes:(c + 1) * votes]
            child.value = sum(v.passed is True for v in verdicts) / votes
            child.score = sum(v.score for v in verdicts) / votes
            # The critique the next refinement works from names what is still wrong: a failing verdict's.
            guide = next((v for v in verdicts if v.passed is not True), verdicts[0])
            child.critique = guide.critique
            passing = next((v for v in verdicts if v.passed is True), None)
            if passing is not None and child.value > options.threshold:
                child.critique = passing.critique  # the winner's PASS judgement row
        for search in active:
            own = sorted((child for s, child in children if s is search),
                         key=lambda node: (node.value, node.score), reverse=True)  # stable: earliest first on ties
            if own and own[0].value > options.threshold:
                search.winner = own[0]
            search.frontier = own[:options.keep]

    pairs: list[dict[str, Any]] = []
    sft: list[dict[str, Any]] = []
    solved = [s for s in searches if s.winner is not None]
    for search in solved:
        prompt, root, winner = search.prompt, search.root, search.winner
        assert winner is not None and winner.parent is not None
        base = {"prompt_id": prompt.id}
        pairs.append({**base, "row_id": f"{prompt.id}-spar-pair", "prompt": prompt.prompt, "chosen": winner.text,
                      "rejected": root.text, "chosen_score": winner.score, "rejected_score": root.score,
                      "origin": "spar:pair", "judge": winner.judge})
        sft.append({**base, "row_id": f"{prompt.id}-spar-refinement", "prompt": winner.request,
                    "completion": winner.text, "score": winner.score, "origin": "spar:refinement",
                    "judge": winner.judge, "ended": winner.ended})
        sft.append({**base, "row_id": f"{prompt.id}-spar-judgement-root", "prompt": critique_prompt(prompt, root.text),
                    "completion": with_verdict_line(root.critique, False), "score": 1.0,
                    "origin": "spar:judgement", "judge": root.judge, "ended": True})
        sft.append({**base, "row_id": f"{prompt.id}-spar-judgement-winner",
                    "prompt": critique_prompt(prompt, winner.text),
                    "completion": with_verdict_line(winner.critique, True), "score": 1.0,
                    "origin": "spar:judgement", "judge": winner.judge, "ended": True})
    mean_depth = sum(s.winner.depth for s in solved) / len(solved) if solved else 0.0  # type: ignore[union-attr]
    return _result(pairs, sft, {"searched": len(searches), "solved": len(solved), "nodes_expanded": expanded,
                                "nodes_generated": generated, "mean_depth": mean_depth})
