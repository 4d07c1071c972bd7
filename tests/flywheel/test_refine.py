import re
from collections import Counter

import pandas as pd
import pytest

from flywheel.config import SelfRefineConfig, SparConfig
from flywheel.feedback import judge_table
from flywheel.generation import Completion, SamplingParams
from flywheel.judges import JudgeVerdict, VerifierJudge, parse_verdict
from flywheel.prompts import Prompt
from flywheel.refine import (
    REFINE_PAIR_COLUMNS,
    REFINE_SFT_COLUMNS,
    refine_answers,
    self_refine,
    spar_search,
)
from flywheel.verifiers import Constraint

LOWER = Prompt(id="p-lower", prompt="Describe tea. Answer in lowercase.",
               constraints=[Constraint(type="all_lowercase")])
BOTH = Prompt(id="p-both", prompt="Describe coffee in lowercase without commas.",
              constraints=[Constraint(type="all_lowercase"), Constraint(type="no_commas")])
EASY = Prompt(id="p-easy", prompt="Describe milk in lowercase.", constraints=[Constraint(type="all_lowercase")])
PROMPTS = [LOWER, BOTH, EASY]

# The text a request quotes: the response of a critique request, the answer of a rewrite or refine request.
_QUOTED = re.compile(r"(?:RESPONSE|ANSWER):\n(.*?)\n\n(?:CRITIQUE|Write a short critique)", re.DOTALL)


def quoted(request_text: str) -> str:
    match = _QUOTED.search(request_text)
    assert match is not None, request_text
    return match.group(1)


def is_critique(request_text: str) -> bool:
    return request_text.startswith("You are a strict grader")


class FakeEngine:
    """Answers each request with ``reply(request_text, sample_index)``; records every call. ``cut_off(reply)``:
    whether the token limit cut that reply off (``Completion.finished`` false)."""

    def __init__(self, reply, cut_off=lambda text: False):
        self.reply = reply
        self.cut_off = cut_off
        self.calls: list[tuple[list[str], int, SamplingParams]] = []

    def generate(self, requests, samples, params, progress=None):
        texts = [r.messages[-1]["content"] for r in requests]
        self.calls.append((texts, samples, params))
        replies = [(i, s, self.reply(text, s)) for i, text in enumerate(texts) for s in range(samples)]
        return [Completion(request_index=i, sample_index=s, text=reply, n_tokens=3, finished=not self.cut_off(reply))
                for i, s, reply in replies]


def samples_table(rows: list[tuple[Prompt, str]]):
    index = {p.id: i for i, p in enumerate(PROMPTS)}
    seen: Counter = Counter()
    completions = []
    for prompt, text in rows:
        completions.append(Completion(request_index=index[prompt.id], sample_index=seen[prompt.id], text=text,
                                      n_tokens=3, finished=True))
        seen[prompt.id] += 1
    return judge_table(PROMPTS, completions).frame


SAMPLES = samples_table([
    (LOWER, "Tea Is Warm."), (LOWER, "tea is warm."),      # fail (0.0), pass
    (BOTH, "coffee, hot."), (BOTH, "Coffee, Hot."),        # fail 0.5, fail 0.0 (the worst)
    (EASY, "milk is white."),                              # pass: never refined
])


def fixer(critique_verdict="FAIL"):
    """Critiques end with ``critique_verdict``; rewrites lowercase the answer and drop its commas."""
    def reply(text, sample):
        if is_critique(text):
            verdict = critique_verdict(quoted(text)) if callable(critique_verdict) else critique_verdict
            return f"It breaks the requirements.\nVERDICT: {verdict}"
        return quoted(text).lower().replace(",", "")
    return reply


def check_tables(result):
    assert list(result.pairs.columns) == REFINE_PAIR_COLUMNS
    assert list(result.sft.columns) == REFINE_SFT_COLUMNS
    for frame in (result.pairs, result.sft):
        assert not frame["row_id"].duplicated().any()
    assert not result.pairs["prompt_id"].duplicated().any()
    assert result.pairs["chosen_score"].dtype == float and result.sft["score"].dtype == float
    assert all(0.0 <= x <= 1.0 for x in [*result.pairs["chosen_score"], *result.pairs["rejected_score"],
                                         *result.sft["score"]])


# --- SELF ---------------------------------------------------------------------------------------------------------

def test_self_refine_takes_the_worst_failed_answer_per_prompt_worst_first():
    engine = FakeEngine(fixer())
    self_refine(PROMPTS, SAMPLES, engine, VerifierJudge(), SelfRefineConfig(), max_new_tokens=32)
    critiques = engine.calls[0][0]
    assert all(is_critique(t) for t in critiques)
    assert [quoted(t) for t in critiques] == ["Coffee, Hot.", "Tea Is Warm."]  # both score 0: prompt id order

    engine = FakeEngine(fixer())
    samples = SAMPLES.copy()
    samples.loc[samples["response"] == "Coffee, Hot.", "score"] = 0.4  # still p-both's worst, no longer the worst
    result = self_refine(PROMPTS, samples, engine, VerifierJudge(), SelfRefineConfig(max_answers=1),
                         max_new_tokens=32)
    assert [quoted(t) for t in engine.calls[0][0]] == ["Tea Is Warm."]
    assert set(result.pairs["prompt_id"]) == {"p-lower"} and result.stats["answers_refined"] == 1


def test_self_refine_pairs_are_refined_over_original_and_accepted_rewrites_are_sft():
    engine = FakeEngine(fixer())
    result = self_refine(PROMPTS, SAMPLES, engine, VerifierJudge(), SelfRefineConfig(meta_skill=False),
                         max_new_tokens=32, seed=3)
    check_tables(result)
    pairs = result.pairs.set_index("prompt_id")
    assert sorted(pairs.index) == ["p-both", "p-lower"]
    assert pairs.loc["p-both", "chosen"] == "coffee hot." and pairs.loc["p-both", "rejected"] == "Coffee, Hot."
    assert pairs.loc["p-lower", "chosen"] == "tea is warm." and pairs.loc["p-lower", "rejected"] == "Tea Is Warm."
    assert (pairs["chosen_score"] == 1.0).all() and (pairs["rejected_score"] == 0.0).all()
    assert set(result.pairs["origin"]) == {"self_refine:pair"} and set(result.pairs["judge"]) == {"verifier"}
    assert set(result.sft["origin"]) == {"self_refine:refined"}
    assert sorted(result.sft["completion"]) == ["coffee hot.", "tea is warm."]
    assert result.sft.set_index("prompt_id").loc["p-both", "prompt"] == BOTH.prompt
    # Two engine calls (critiques, rewrites) with their own lengths; the rewrite request asks for the answer only.
    (crit, n1, p1), (rewrites, n2, p2) = engine.calls
    assert (n1, p1.max_new_tokens, n2, p2.max_new_tokens) == (1, 96, 1, 32)
    assert "It breaks the requirements." in rewrites[0] and "full corrected answer only" in rewrites[0]
    assert result.stats["refined_passed"] == 2 and result.stats["pairs"] == 2 and result.stats["meta_rows"] == 0


def test_self_refine_picks_the_best_of_several_rewrites_and_skips_rewrites_that_do_not_improve():
    def reply(text, sample):
        if is_critique(text):
            return "VERDICT: FAIL"
        answer = quoted(text)
        if answer.startswith("Coffee"):
            return ["COFFEE, HOT.", "coffee hot.", "coffee, hot."][sample]  # only sample 1 passes
        return answer  # no change: scores no higher than the original
    engine = FakeEngine(reply)
    result = self_refine(PROMPTS, SAMPLES, engine, VerifierJudge(),
                         SelfRefineConfig(refinements=3, refine_max_new_tokens=7, meta_skill=False),
                         max_new_tokens=32)
    assert engine.calls[1][1] == 3 and engine.calls[1][2].max_new_tokens == 7
    assert list(result.pairs["prompt_id"]) == ["p-both"] and list(result.pairs["chosen"]) == ["coffee hot."]
    assert list(result.sft["completion"]) == ["coffee hot."]
    assert result.stats["rewrites"] == 6 and result.stats["refined_passed"] == 1


def test_self_refine_meta_rows_only_where_the_model_verdict_matches_the_judge():
    # The model wrongly passes its lowercase-tea answer and rightly fails the coffee one.
    engine = FakeEngine(fixer(lambda answer: "PASS" if answer.startswith("Tea") else "FAIL"))
    result = self_refine(PROMPTS, SAMPLES, engine, VerifierJudge(), SelfRefineConfig(), max_new_tokens=32)
    check_tables(result)
    critiques = result.sft[result.sft["origin"] == "self_refine:critique"]
    assert list(critiques["prompt_id"]) == ["p-both"]
    completion = critiques["completion"].iloc[0]
    assert completion.splitlines()[-1] == "VERDICT: FAIL" and parse_verdict(completion).passed is False
    assert critiques["prompt"].iloc[0].startswith("You are a strict grader") and "Coffee, Hot." in \
        critiques["prompt"].iloc[0]
    refinements = result.sft[result.sft["origin"] == "self_refine:refinement"]
    assert sorted(refinements["prompt_id"]) == ["p-both", "p-lower"]
    assert all("YOUR ANSWER:" in p for p in refinements["prompt"])
    assert sorted(refinements["completion"]) == ["coffee hot.", "tea is warm."]
    assert result.stats["meta_rows"] == 3 and result.stats["critique_agreement"] == 0.5


def test_self_refine_rows_record_whether_the_rewrite_was_cut_off():
    # The coffee rewrite ran into the token limit; critiques end on their verdict line whatever their length.
    engine = FakeEngine(fixer(), cut_off=lambda reply: reply.startswith("coffee") or "requirements" in reply)
    result = self_refine(PROMPTS, SAMPLES, engine, VerifierJudge(), SelfRefineConfig(), max_new_tokens=32)
    check_tables(result)
    assert result.sft["ended"].dtype == bool
    ended = {(row.prompt_id, row.origin): row.ended for row in result.sft.itertuples()}
    assert ended == {("p-both", "self_refine:refined"): False, ("p-lower", "self_refine:refined"): True,
                     ("p-both", "self_refine:refinement"): False, ("p-lower", "self_refine:refinement"): True,
                     ("p-both", "self_refine:critique"): True, ("p-lower", "self_refine:critique"): True}


def test_self_refine_without_failed_answers_returns_empty_typed_tables():
    samples = samples_table([(EASY, "milk is white.")])
    engine = FakeEngine(fixer())
    result = self_refine(PROMPTS, samples, engine, VerifierJudge(), SelfRefineConfig(), max_new_tokens=8)
    check_tables(result)
    assert result.pairs.empty and result.sft.empty and engine.calls == []
    with pytest.raises(ValueError, match="not among the prompts"):
        self_refine([EASY], SAMPLES, engine, VerifierJudge(), SelfRefineConfig(), max_new_tokens=8)
    with pytest.raises(ValueError, match="lacks column"):
        self_refine(PROMPTS, SAMPLES.drop(columns=["critique"]), engine, VerifierJudge(), SelfRefineConfig(),
                    max_new_tokens=8)


def test_refine_answers_critiques_and_rewrites_until_the_model_is_satisfied():
    def reply(text, sample):
        if is_critique(text):
            return "Fine.\nVERDICT: PASS" if quoted(text).islower() else "Capitals.\nVERDICT: FAIL"
        return quoted(text).lower()
    engine = FakeEngine(reply)
    params = SamplingParams(max_new_tokens=16)
    out = refine_answers([LOWER, EASY], ["Tea Is Warm.", "milk is white."], engine, rounds=3, params=params)
    assert out == ["tea is warm.", "milk is white."]
    # Round 1: critique both, rewrite one; round 2: critique the rewrite, which passes; no round 3.
    assert [len(texts) for texts, _, _ in engine.calls] == [2, 1, 1]
    assert refine_answers([LOWER], ["X"], FakeEngine(reply), rounds=0, params=params) == ["X"]
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        refine_answers([LOWER, EASY], ["x"], engine, rounds=1, params=params)


# --- SPaR ---------------------------------------------------------------------------------------------------------

def tree(children: dict[str, list[str]]):
    """A refiner whose sample k of a node is ``children[node][k]``; nodes not listed are repeated in capitals."""
    def reply(text, sample):
        assert text.startswith("The ANSWER below"), text
        answer = quoted(text)
        return children.get(answer, [answer.upper() + f" {sample}"] * 16)[sample]
    return reply


TREE = {
    "Coffee, Hot.": ["coffee, hot.", "Coffee Hot.", "COFFEE"],   # scores 0.5, 0.5, 0.0: the first two kept
    "coffee, hot.": ["coffee hot.", "coffee, warm.", "Coffee"],  # depth 2: "coffee hot." passes
    "Coffee Hot.": ["Coffee Hot!", "COFFEE HOT", "Coffee"],
}


def test_spar_stops_at_the_first_passing_node_and_respects_breadth_and_keep():
    engine = FakeEngine(tree(TREE))
    options = SparConfig(breadth=3, keep=2, depth=3, judge_samples=5)
    samples = samples_table([(BOTH, "coffee, hot."), (BOTH, "Coffee, Hot.")])
    result = spar_search(PROMPTS, samples, engine, VerifierJudge(), options, max_new_tokens=24,
                         judge_deterministic=True)
    check_tables(result)
    # Depth 1 refines the root; depth 2 the two best children; a pass at depth 2 ends the search before depth 3.
    assert [(len(texts), n) for texts, n, _ in engine.calls] == [(1, 3), (2, 3)]
    assert [quoted(t) for t in engine.calls[1][0]] == ["coffee, hot.", "Coffee Hot."]
    assert all("smallest edit" in t and "Fails 1 of 2" in t for t in engine.calls[1][0])
    assert engine.calls[0][2].max_new_tokens == 24 and engine.calls[0][2].temperature == options.temperature
    pair = result.pairs.iloc[0]
    assert (pair["chosen"], pair["rejected"], pair["origin"]) == ("coffee hot.", "Coffee, Hot.", "spar:pair")
    assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, 0.0)
    assert result.stats["solved"] == 1 and result.stats["mean_depth"] == 2.0 and result.stats["nodes_expanded"] == 3

    sft = result.sft.set_index("row_id")
    refinement = sft.loc["p-both-spar-refinement"]
    assert refinement["origin"] == "spar:refinement" and refinement["completion"] == "coffee hot."
    assert quoted(refinement["prompt"]) == "coffee, hot."  # the parent's refine request
    judgements = result.sft[result.sft["origin"] == "spar:judgement"]
    verdicts = {quoted(p): parse_verdict(c).passed for p, c in zip(judgements["prompt"], judgements["completion"])}
    assert verdicts == {"Coffee, Hot.": False, "coffee hot.": True}
    assert all(c.splitlines()[-1] in ("VERDICT: PASS", "VERDICT: FAIL") for c in judgements["completion"])


def test_spar_refinement_row_records_whether_the_winner_was_cut_off():
    samples = samples_table([(BOTH, "coffee, hot."), (BOTH, "Coffee, Hot.")])
    for cut_off in (True, False):
        engine = FakeEngine(tree(TREE), cut_off=lambda reply: cut_off and reply == "coffee hot.")
        result = spar_search(PROMPTS, samples, engine, VerifierJudge(), SparConfig(breadth=3, keep=2, depth=3),
                             max_new_tokens=24, judge_deterministic=True)
        check_tables(result)
        ended = dict(zip(result.sft["row_id"], result.sft["ended"]))
        assert ended == {"p-both-spar-refinement": not cut_off, "p-both-spar-judgement-root": True,
                         "p-both-spar-judgement-winner": True}


def test_spar_batches_every_prompt_of_a_depth_into_one_call_and_gives_up_after_depth_levels():
    engine = FakeEngine(tree(TREE))
    options = SparConfig(breadth=2, keep=1, depth=3, judge_samples=1)
    result = spar_search(PROMPTS, SAMPLES, engine, VerifierJudge(), options, max_new_tokens=8)
    check_tables(result)
    # p-both: depth 1 -> "coffee, hot." (kept), depth 2 -> "coffee hot." passes. p-lower: capitals forever.
    assert [len(texts) for texts, _, _ in engine.calls] == [2, 2, 1]
    assert {quoted(t) for t in engine.calls[0][0]} == {"Coffee, Hot.", "Tea Is Warm."}
    assert list(result.pairs["prompt_id"]) == ["p-both"]  # the unsolved prompt yields no pair
    assert set(result.sft["prompt_id"]) == {"p-both"}
    assert result.stats["searched"] == 2 and result.stats["solved"] == 1 and result.stats["nodes_expanded"] == 5


def test_spar_judge_samples_vote_with_a_nondeterministic_judge():
    class FlakyJudge:
        """Within one call, the first ``passes[text]`` copies of a text pass; every other copy fails."""
        name, source = "flaky", "test"

        def __init__(self, passes):
            self.passes, self.calls = passes, []

        def judge(self, items):
            self.calls.append([text for _, text in items])
            seen: Counter = Counter()
            out = []
            for _, text in items:
                ok = seen[text] < self.passes.get(text, 0)
                seen[text] += 1
                out.append(JudgeVerdict(score=1.0 if ok else 0.0, passed=ok, judge=self.name,
                                        critique="fine" if ok else f"{text} is wrong"))
            return out

    children = {"Coffee, Hot.": ["two", "three"], "two": ["x", "x"], "three": ["y", "y"]}
    samples = samples_table([(BOTH, "Coffee, Hot.")])
    judge = FlakyJudge({"two": 2, "three": 3})
    options = SparConfig(breadth=2, keep=2, depth=2, judge_samples=5, threshold=0.5)
    result = spar_search(PROMPTS, samples, FakeEngine(tree(children)), judge, options, max_new_tokens=8)
    assert len(judge.calls) == 1 and Counter(judge.calls[0]) == {"two": 5, "three": 5}
    assert list(result.pairs["chosen"]) == ["three"] and list(result.pairs["chosen_score"]) == [0.6]
    assert list(result.pairs["judge"]) == ["flaky"]

    # 2 of 5 (0.4) is not above the threshold: the search goes on from both children and never passes.
    judge = FlakyJudge({"two": 2})
    result = spar_search(PROMPTS, samples, FakeEngine(tree(children)), judge, options, max_new_tokens=8)
    assert result.pairs.empty and result.stats["solved"] == 0 and len(judge.calls) == 2
    # A deterministic judge is asked once per node: one pass is a value of 1.
    judge = FlakyJudge({"two": 1})
    result = spar_search(PROMPTS, samples, FakeEngine(tree(children)), judge, options, max_new_tokens=8,
                         judge_deterministic=True)
    assert Counter(judge.calls[0]) == {"two": 1, "three": 1} and list(result.pairs["chosen"]) == ["two"]


def test_spar_drops_children_that_repeat_their_parent():
    engine = FakeEngine(lambda text, sample: quoted(text))
    samples = samples_table([(LOWER, "Tea Is Warm.")])
    result = spar_search(PROMPTS, samples, engine, VerifierJudge(), SparConfig(breadth=2, depth=3),
                         max_new_tokens=8)
    assert len(engine.calls) == 1 and result.pairs.empty and result.stats["nodes_generated"] == 0


# --- on a real (tiny) model ---------------------------------------------------------------------------------------

def test_both_strategies_run_on_the_tiny_model(tiny_model_dir):
    from flywheel.generation import TransformersEngine

    engine = TransformersEngine(tiny_model_dir, device="cpu", batch_size=16)
    verifier = VerifierJudge()
    refined = self_refine(PROMPTS, SAMPLES, engine, verifier,
                          SelfRefineConfig(refinements=2, critique_max_new_tokens=8), max_new_tokens=8, seed=1)
    searched = spar_search(PROMPTS, SAMPLES, engine, verifier, SparConfig(breadth=2, keep=1, depth=2),
                           max_new_tokens=8, judge_deterministic=True)
    for result in (refined, searched):
        check_tables(result)
        assert result.pairs["chosen"].map(type).eq(str).all() and result.sft["completion"].map(type).eq(str).all()
        assert isinstance(pd.DataFrame(result.pairs), pd.DataFrame)
        assert all(isinstance(v, float) for v in result.stats.values())
    assert refined.stats["answers_refined"] == 2 and refined.stats["rewrites"] == 4
    assert searched.stats["searched"] == 2 and 2 <= searched.stats["nodes_expanded"] <= 4
