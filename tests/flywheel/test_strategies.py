"""The strategy dispatch: best-of-n rows with their provenance, refinement rows merged one pair per prompt, and the
round's judges as one judge."""

import json

import pandas as pd
import pytest

from flywheel.config import FlywheelConfig
from flywheel.feedback import RoundJudge
from flywheel.judges import JudgeVerdict
from flywheel.prompts import Constraint, Prompt
from flywheel.strategies import best_of_n, merge_refined


def _sample(prompt_id, index, response, score, judge="verifier"):
    return {"row_id": f"{prompt_id}-s{index}", "prompt_id": prompt_id, "prompt": f"prompt {prompt_id}",
            "sample_index": index, "response": response, "n_tokens": 3, "finished": True, "score": score,
            "passed": score == 1.0, "checks": json.dumps({}), "judge": judge,
            "verdict": "pass" if score == 1.0 else "fail", "critique": "", "llm_verdict": "", "llm_critique": ""}


SAMPLES = pd.DataFrame([
    _sample("a", 0, "good a", 1.0), _sample("a", 1, "bad a", 0.0),
    _sample("b", 0, "half b", 0.5, judge="self"), _sample("b", 1, "worse b", 0.0, judge="self"),
    _sample("c", 0, "same", 0.0), _sample("c", 1, "same too", 0.0),
])


def test_best_of_n_rows_carry_strategy_and_judge():
    config = FlywheelConfig.model_validate({"feedback": {"chosen_must_pass": False, "sft_min_score": 1.0}})
    made = best_of_n(SAMPLES, config)
    assert list(made.pairs["prompt_id"]) == ["a", "b"]  # c: no score gap, no pair
    assert set(made.pairs["origin"]) == {"best_of_n:pair"}
    assert dict(zip(made.pairs["prompt_id"], made.pairs["judge"])) == {"a": "verifier", "b": "self"}
    assert list(made.sft["completion"]) == ["good a"] and list(made.sft["origin"]) == ["best_of_n:accepted"]
    assert made.stats == {"best_of_n_pairs": 2.0, "best_of_n_sft": 1.0}


def test_best_of_n_on_no_samples_keeps_the_columns():
    made = best_of_n(SAMPLES.iloc[:0], FlywheelConfig())
    assert len(made.pairs) == 0 and {"origin", "judge", "chosen"} <= set(made.pairs.columns)
    assert len(made.sft) == 0 and {"origin", "judge", "completion"} <= set(made.sft.columns)


def test_a_refined_pair_replaces_the_best_of_n_pair_of_its_prompt():
    config = FlywheelConfig.model_validate({"feedback": {"chosen_must_pass": False}})
    base = best_of_n(SAMPLES, config)
    refined = pd.DataFrame([{"row_id": "b-refined", "prompt_id": "b", "prompt": "prompt b", "chosen": "fixed b",
                             "rejected": "worse b", "chosen_score": 1.0, "rejected_score": 0.0,
                             "origin": "self_refine:pair", "judge": "verifier"}])
    sft = pd.DataFrame([{"row_id": "b-r", "prompt_id": "b", "prompt": "prompt b", "completion": "fixed b",
                         "score": 1.0, "origin": "self_refine:refined", "judge": "verifier"},
                        {"row_id": "a-dup", "prompt_id": "a", "prompt": "prompt a", "completion": "good a",
                         "score": 1.0, "origin": "self_refine:refined", "judge": "verifier"}])
    merged = merge_refined(base, refined, sft, {"self_refine_pairs": 1.0})
    assert merged.pairs["prompt_id"].is_unique
    assert dict(zip(merged.pairs["prompt_id"], merged.pairs["origin"])) == {
        "a": "best_of_n:pair", "b": "self_refine:pair"}
    # The same (prompt, completion) is learned once, from whichever made it first.
    assert sorted(merged.sft["row_id"]) == ["a-sft0", "b-r"]
    assert merged.stats["self_refine_pairs"] == 1.0 and merged.stats["best_of_n_pairs"] == 2.0


class _Scripted:
    name, source = "self", "scripted"

    def __init__(self):
        self.seen = []

    def judge(self, items):
        self.seen += [response for _, response in items]
        return [JudgeVerdict(score=1.0, passed=True, critique="fine", judge=self.name) for _ in items]


LOWER = Prompt(id="p1", prompt="write in lowercase", constraints=[Constraint(type="all_lowercase")])


@pytest.mark.parametrize("scope, decided_by_llm", [("unverifiable", False), ("all", True)])
def test_round_judge_decides_as_the_samples_table_does(scope, decided_by_llm):
    llm = _Scripted()
    judge = RoundJudge(llm=llm, llm_scope=scope)
    verdict, = judge.judge([(LOWER, "SHOUTING")])
    assert verdict.passed is decided_by_llm  # the verifier fails it; the LLM judge passes everything
    assert (llm.seen == ["SHOUTING"]) is decided_by_llm
    assert judge.deterministic_for([(LOWER, "")]) is not decided_by_llm
    assert judge.name == "verifier+self"


def test_round_judge_without_a_second_judge_is_the_verifier():
    judge = RoundJudge()
    assert judge.name == "verifier" and judge.deterministic_for([(LOWER, "")])
    assert [v.passed for v in judge.judge([(LOWER, "quiet"), (LOWER, "LOUD")])] == [True, False]


class _Lowercaser:
    """A refiner that lowercases the answer it is asked to edit; records which model folder it was loaded from."""

    def __init__(self, model_dir):
        self.model_dir = model_dir

    def generate(self, requests, samples, params, progress=None):
        from flywheel.generation import Completion

        texts = [r.messages[-1]["content"].split("ANSWER:\n", 1)[1].split("\n\nCRITIQUE:", 1)[0] for r in requests]
        return [Completion(request_index=i, sample_index=s, text=text.lower(), n_tokens=3, finished=True)
                for i, text in enumerate(texts) for s in range(samples)]


@pytest.mark.parametrize("refiner", [None, "refiner-dir"])
def test_spar_refines_with_the_trained_refiner_when_given_one(monkeypatch, tmp_path, refiner):
    from pathlib import Path

    import flywheel.generation
    from flywheel.feedback import judge_table
    from flywheel.generation import Completion
    from flywheel.strategies import build_strategy_data

    loaded = []
    monkeypatch.setattr(flywheel.generation, "make_engine",
                        lambda name, model_dir, *args, **kwargs: loaded.append(Path(model_dir).name)
                        or _Lowercaser(model_dir))
    config = FlywheelConfig.model_validate({"strategy": {"name": "spar", "spar": {"refiner": "trained"}},
                                            "feedback": {"chosen_must_pass": False}})
    samples = judge_table([LOWER], [Completion(request_index=0, sample_index=0, text="Tea Is Warm.", n_tokens=3,
                                               finished=True)]).frame
    made = build_strategy_data(config, [LOWER], samples, champion_dir=tmp_path / "policy-dir", base_dir=tmp_path,
                               device="cpu", refiner_dir=tmp_path / refiner if refiner else None)
    # Only the model that refines is loaded: the policy's answers are the samples table's.
    assert loaded == [refiner or "policy-dir"]
    assert list(made.pairs["chosen"]) == ["tea is warm."] and set(made.pairs["origin"]) == {"spar:pair"}
    assert {"spar:refinement", "spar:judgement"} <= set(made.sft["origin"])
