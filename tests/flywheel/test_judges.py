import json
import re
from pathlib import Path

import pytest
from fake_openai import chat_answer, fake_openai, user_text

from flywheel.config import ConfigError, load_config, parse_config
from flywheel.dataset import build_pairs, build_sft
from flywheel.feedback import SAMPLE_COLUMNS, JudgedTable, check_verdicts, judge_table
from flywheel.generation import Completion, EngineError
from flywheel.judges import (
    JudgeError,
    JudgeVerdict,
    LLMJudge,
    VerifierJudge,
    Vote,
    build_llm_judge,
    critique_prompt,
    majority,
    parse_verdict,
)
from flywheel.prompts import Prompt, save_prompts
from flywheel.verifiers import Constraint

LOWER = Prompt(id="p-lower", prompt="Describe tea. Answer in lowercase.",
               constraints=[Constraint(type="all_lowercase")])
SHORT = Prompt(id="p-short", prompt="Name a fruit in at most three words, without commas.",
               constraints=[Constraint(type="word_count_max", args={"max_words": 3}), Constraint(type="no_commas")])
PROMPTS = [LOWER, SHORT]


def _completion(request: int, sample: int, text: str) -> Completion:
    return Completion(request_index=request, sample_index=sample, text=text, n_tokens=len(text.split()),
                      finished=True)


# (completion, verifier passes, "lowercase teacher" passes)
CASES = [
    (_completion(0, 0, "green tea is calm."), True, True),
    (_completion(0, 1, "Green tea is calm."), False, False),
    (_completion(1, 0, "a ripe apple"), True, True),
    (_completion(1, 1, "apples, pears and plums"), False, True),  # the teacher misses the comma and the length
    (_completion(1, 2, "Apple"), True, False),  # the teacher wrongly wants lowercase
]
COMPLETIONS = [case[0] for case in CASES]


def _response_in(critique_request: str) -> str:
    return re.search(r"RESPONSE:\n(.*?)\n\nWrite a short critique", critique_request, re.DOTALL).group(1)


def lowercase_teacher(request: str) -> str:
    """A fake judge with a fixed opinion: a response passes when it has no capital letter."""
    response = _response_in(request)
    ok = response == response.lower()
    return f"The response is {'all lowercase' if ok else 'not lowercase'}.\n**Verdict: {'PASS' if ok else 'FAIL'}**"


class FakeEngine:
    """An Engine whose answers come from a function of the request text and the sample index."""

    def __init__(self, answer):
        self.answer = answer
        self.calls: list[tuple[int, int, float]] = []

    def generate(self, requests, samples, params, progress=None):
        self.calls.append((len(requests), samples, params.temperature))
        return [Completion(request_index=i, sample_index=s, text=self.answer(r.messages[-1]["content"], s),
                           n_tokens=5, finished=True)
                for i, r in enumerate(requests) for s in range(samples)]


# --- parser, vote -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,passed,critique", [
    ("Good answer.\nVERDICT: PASS", True, "Good answer."),
    ("It uses commas.\nVERDICT: FAIL", False, "It uses commas."),
    ("fine\nverdict: pass", True, "fine"),
    ("Fine.\n\n**VERDICT: PASS**\n\n", True, "Fine."),
    ("Fine.\n**Verdict:** FAIL.", False, "Fine."),
    ("Fine.\n## VERDICT: `PASS`", True, "Fine."),
    ("Fine.\n- Verdict - fail", False, "Fine."),
    ("VERDICT: PASS", True, ""),
    ("VERDICT: PASS\nActually, on reflection it misses a word.", None, None),  # verdict not on the last line
    ("The answer is good. VERDICT: PASS", None, None),  # not a line of its own
    ("Looks right.\nVERDICT: PASSED", None, None),
    ("Looks right.\nVERDICT: PASS or FAIL", None, None),
    ("Looks right.\nVerdict: maybe", None, None),
    ("Looks right.", None, None),
    ("", None, None),
    ("   \n  ", None, None),
])
def test_verdict_parser(text, passed, critique):
    vote = parse_verdict(text)
    assert vote.passed is passed
    if critique is not None:
        assert vote.critique == critique


def _votes(*marks: str) -> list[Vote]:
    value = {"P": True, "F": False, "-": None}
    return [Vote(passed=value[m], critique=f"critique {k} {m}") for k, m in enumerate(marks)]


@pytest.mark.parametrize("marks,passed,score", [
    ("P", True, 1.0),
    ("F", False, 0.0),
    ("PPF", True, 2 / 3),
    ("PFF", False, 1 / 3),
    ("PF", None, 0.5),  # tie: no verdict
    ("PF-", None, 0.5),  # a vote without a verdict does not break a tie
    ("P--", True, 1.0),  # the votes with a verdict decide
    ("---", None, 0.0),
    ("-", None, 0.0),
    ("PPFF", None, 0.5),
])
def test_majority_vote_and_ties(marks, passed, score):
    verdict = majority(_votes(*marks), "self")
    assert verdict.passed is passed and verdict.score == pytest.approx(score) and verdict.judge == "self"
    if passed is None:
        assert verdict.critique.startswith("No verdict")
    else:
        side = "P" if passed else "F"
        assert f"critique {marks.index(side)} {side}" in verdict.critique  # the first critique of the majority


# --- verifier judge -----------------------------------------------------------------------------------------------

def test_verifier_judge_critique_names_failed_constraints():
    verdicts = VerifierJudge().judge([(SHORT, "a ripe apple"), (SHORT, "apple, pear"),
                                      (SHORT, "apples, pears and plums"), (LOWER, "  ")])
    assert [v.passed for v in verdicts] == [True, False, False, False]
    assert [v.score for v in verdicts] == [1.0, 0.5, 0.0, 0.0]
    assert verdicts[0].critique == "Meets all 2 constraints."
    assert verdicts[1].critique == "Fails 1 of 2: In your entire response, refrain from the use of any commas."
    assert "Answer with at most 3 words." in verdicts[2].critique and "commas" in verdicts[2].critique
    assert verdicts[3].critique.startswith("The response is empty.")
    assert all(v.judge == "verifier" for v in verdicts)


def test_verifier_judge_with_echo_ngram_fails_an_answer_that_copies_its_instructions():
    titled = Prompt(id="p-title", prompt="Describe tea. Your answer must contain a title, wrapped in double angular "
                    "brackets, such as <<my title>>.", constraints=[Constraint(type="title")])
    items = [(titled, "<<my title>>\n\nTea is a drink."), (titled, "<<On Tea>>\n\nTea is a drink.")]
    plain = VerifierJudge().judge(items)
    assert [v.passed for v in plain] == [True, True]  # the checks alone are met by the copy
    strict = VerifierJudge(echo_ngram=6).judge_with_checks(items)
    (copied, copied_checks), (own, _) = strict
    assert (copied.passed, copied.score) == (False, 0.0) and copied_checks == [True]
    assert copied.critique == 'Copies its instructions instead of following them: the example "my title".'
    assert (own.passed, own.score) == (True, 1.0)
    # In a round's table the copy is neither an SFT row nor a chosen answer; it is the rejected side of the pair.
    frame = judge_table([titled], [Completion(request_index=0, sample_index=i, text=text, n_tokens=5,
                                              finished=True) for i, (_, text) in enumerate(items)],
                        echo_ngram=6).frame
    config = parse_config({"feedback": {"echo_ngram": 6}}).feedback
    assert build_sft(frame, config)["completion"].tolist() == [items[1][1]]
    assert build_pairs(frame, config)[["chosen", "rejected"]].values.tolist() == [[items[1][1], items[0][1]]]


def test_verifier_judge_gives_no_verdict_without_constraints():
    free = Prompt.model_construct(id="p-free", prompt="Tell me about tea.", constraints=[], topic="")
    verdict = VerifierJudge().judge([(free, "Tea is a drink.")])[0]
    assert verdict.passed is None and "cannot judge" in verdict.critique


# --- LLM judge ----------------------------------------------------------------------------------------------------

def test_critique_prompt_shows_requirements_and_response():
    text = critique_prompt(SHORT, "apple, pear")
    assert SHORT.prompt in text and "- Answer with at most 3 words." in text and "apple, pear" in text
    assert text.rstrip().endswith('or "VERDICT: FAIL" if it does not.')
    assert "(empty)" in critique_prompt(SHORT, "")


def test_llm_judge_with_a_fake_engine_votes_per_row():
    # Votes per sample index: rows of p-lower get P, F, P (pass); rows of p-short get F, F, P (fail).
    def answer(request: str, sample: int) -> str:
        marks = "PFP" if "lowercase" in request else "FFP"
        return f"Critique {sample}.\nVERDICT: {'PASS' if marks[sample] == 'P' else 'FAIL'}"

    engine = FakeEngine(answer)
    judge = LLMJudge(engine, "self", "fake", votes=3, temperature=0.9, max_new_tokens=64)
    verdicts = judge.judge([(LOWER, "green tea"), (SHORT, "a ripe apple")])
    assert engine.calls == [(2, 3, 0.9)]  # one batched call, votes as samples, sampled
    assert [v.passed for v in verdicts] == [True, False]
    assert verdicts[0].score == pytest.approx(2 / 3) and verdicts[1].score == pytest.approx(1 / 3)
    assert verdicts[0].critique == "[2 PASS, 1 FAIL of 3 votes] Critique 0."
    assert judge.judge([]) == []


def test_single_vote_is_greedy():
    engine = FakeEngine(lambda request, sample: "ok\nVERDICT: PASS")
    LLMJudge(engine, "teacher", "fake", votes=1, temperature=0.9).judge([(LOWER, "tea")])
    assert engine.calls == [(1, 1, 0.0)]


def test_engine_failure_becomes_a_judge_error_naming_the_judge():
    class Broken:
        def generate(self, requests, samples, params, progress=None):
            raise EngineError("http://127.0.0.1:1/v1/chat/completions: answer is not JSON: <html>")

    with pytest.raises(JudgeError, match=r"^teacher judge \(http://x model m\): http://127\.0\.0\.1:1/v1.*not JSON"):
        LLMJudge(Broken(), "teacher", "http://x model m").judge([(LOWER, "tea")])


# --- combination, agreement ---------------------------------------------------------------------------------------

def _lowercase_judge(name: str = "teacher") -> LLMJudge:
    return LLMJudge(FakeEngine(lambda request, sample: lowercase_teacher(request)), name, "fake")


def test_verifier_alone_keeps_the_old_table():
    result = judge_table(PROMPTS, COMPLETIONS)
    frame = result.frame
    assert list(frame.columns) == SAMPLE_COLUMNS
    assert frame["passed"].tolist() == [case[1] for case in CASES]
    assert set(frame["judge"]) == {"verifier"} and set(frame["llm_verdict"]) == {""}
    assert result.agreement is None and result.agreement_rows == 0 and result.no_verdict == 0


def test_llm_scope_all_lets_the_llm_decide_and_reports_agreement():
    result = judge_table(PROMPTS, COMPLETIONS, llm=_lowercase_judge(), llm_scope="all")
    frame = result.frame
    assert frame["judge"].tolist() == ["teacher"] * 5
    assert frame["passed"].tolist() == [case[2] for case in CASES]
    assert frame["verdict"].tolist() == ["pass" if case[2] else "fail" for case in CASES]
    assert frame["critique"].tolist()[0] == "The response is all lowercase."
    # the verifier's per-constraint results are still recorded
    assert json.loads(frame["checks"][3]) == {"word_count_max": False, "no_commas": False}
    assert result.agreement == pytest.approx(3 / 5) and result.agreement_rows == 5


def test_unverifiable_scope_lets_the_verifier_decide_and_samples_rows_for_agreement():
    result = judge_table(PROMPTS, COMPLETIONS, llm=_lowercase_judge(), llm_scope="unverifiable",
                         agreement_sample=3, seed=1)
    frame = result.frame
    assert frame["judge"].tolist() == ["verifier"] * 5
    assert frame["passed"].tolist() == [case[1] for case in CASES]
    judged_by_llm = frame[frame["llm_verdict"] != ""]
    assert len(judged_by_llm) == 3 == result.llm_rows == result.agreement_rows
    expected = sum(CASES[i][1] == CASES[i][2] for i in judged_by_llm.index) / 3
    assert result.agreement == pytest.approx(expected)
    again = judge_table(PROMPTS, COMPLETIONS, llm=_lowercase_judge(), agreement_sample=3, seed=1)
    assert again.frame["llm_verdict"].tolist() == frame["llm_verdict"].tolist()  # the sample is seeded


def test_the_llm_judge_decides_what_the_verifier_cannot_check():
    free = Prompt.model_construct(id="p-free", prompt="Tell me about tea.", constraints=[], topic="")
    completions = [*COMPLETIONS, _completion(2, 0, "tea is a drink."), _completion(2, 1, "Tea Is A Drink.")]
    result = judge_table([*PROMPTS, free], completions, llm=_lowercase_judge("self"), agreement_sample=0)
    frame = result.frame
    assert frame["judge"].tolist() == ["verifier"] * 5 + ["self", "self"]
    assert frame["verdict"].tolist()[-2:] == ["pass", "fail"]
    assert result.agreement is None  # no row was judged by both
    # without an LLM judge those rows have no verdict, stay in the table, and never become training data
    alone = judge_table([*PROMPTS, free], completions).frame
    assert alone["verdict"].tolist()[-2:] == ["none", "none"] and len(alone) == 7
    feedback = parse_config({"feedback": {"sft_min_score": 0.0, "chosen_must_pass": False}}).feedback
    assert "p-free" not in set(build_sft(alone, feedback)["prompt_id"])
    assert "p-free" not in set(build_pairs(alone, feedback)["prompt_id"])
    assert "p-free" in set(build_sft(frame, feedback)["prompt_id"])


def test_rows_without_verdict_are_kept_but_not_used_for_training():
    ties = LLMJudge(FakeEngine(lambda request, sample: "Unsure.\nVERDICT: " + ("PASS" if sample else "FAIL")),
                    "self", "fake", votes=2, temperature=0.7)
    result = judge_table(PROMPTS, COMPLETIONS, llm=ties, llm_scope="all")
    assert result.frame["verdict"].tolist() == ["none"] * 5 and result.no_verdict == 5 and result.agreement is None
    assert not result.frame["passed"].any()
    feedback = parse_config({"feedback": {"sft_min_score": 0.0, "chosen_must_pass": False}}).feedback
    assert build_sft(result.frame, feedback).empty and build_pairs(result.frame, feedback).empty


def test_too_many_rows_without_verdict_stop_with_the_judge_named():
    judge = LLMJudge(FakeEngine(lambda request, sample: "I think it is fine."), "teacher", "http://h/v1 model m")
    result = judge_table(PROMPTS, COMPLETIONS, llm=judge, llm_scope="unverifiable", agreement_sample=5)
    assert result.no_verdict == 0 and result.llm_no_verdict == 5  # the verifier decided, yet the judge is broken
    with pytest.raises(JudgeError, match=r"^teacher judge \(http://h/v1 model m\): no verdict for 5 of 5 rows"):
        check_verdicts(result, 0.2, judge)
    check_verdicts(judge_table(PROMPTS, COMPLETIONS, llm=_lowercase_judge(), llm_scope="all"), 0.0,
                   _lowercase_judge())  # every row has a verdict: passes even with no tolerance


def test_verifier_without_verdicts_is_named_too():
    free = Prompt.model_construct(id="p-free", prompt="Tell me about tea.", constraints=[], topic="")
    result = judge_table([free], [_completion(0, 0, "tea")])
    assert isinstance(result, JudgedTable)
    with pytest.raises(JudgeError, match=r"^verifier judge: no verdict for 1 of 1 samples"):
        check_verdicts(result, 0.5)


# --- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("feedback,fragment", [
    ({"judges": ["verifier", "teacher"]}, "no teacher section"),
    ({"teacher": {"model": "x"}}, "'teacher' is not in judges"),
    ({"judges": ["self", "teacher"], "teacher": {"model": "x"}}, "one judge besides the verifier"),
    ({"judges": ["verifier", "verifier"]}, "twice"),
    ({"judges": ["self"]}, "set llm_scope: all"),
    ({"judges": ["verifier", "self"], "votes": 2}, "votes (2) is even"),
    ({"judges": ["verifier", "self"], "votes": 3, "judge_temperature": 0}, "repeats one greedy vote"),
    ({"judges": ["verifier", "human"]}, "feedback.judges.1"),
    ({"judges": ["verifier", "teacher"], "teacher": {"model": "m", "base_url": "localhost:8000"}}, "http://"),
    ({"judges": ["verifier", "teacher"], "teacher": {"model": "m", "api_key": "secret"}}, "unknown key"),
])
def test_judge_config_errors(feedback, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_config({"feedback": feedback})
    assert fragment in str(caught.value)


def test_even_votes_allowed_when_ties_are_accepted():
    config = parse_config({"feedback": {"judges": ["verifier", "self"], "votes": 4, "allow_ties": True}})
    assert config.feedback.votes == 4


def test_local_teacher_folder_must_exist(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("feedback:\n  judges: [verifier, teacher]\n  teacher:\n    model: ./teacher-model\n")
    with pytest.raises(ConfigError, match=r"feedback\.teacher\.model: model folder not found"):
        load_config(recipe, base_dir=tmp_path)
    (tmp_path / "teacher-model").mkdir()
    assert load_config(recipe, base_dir=tmp_path).feedback.teacher.base_url is None


def test_self_judge_runs_the_champion_through_the_generation_engine(tiny_model_dir):
    config = parse_config({"feedback": {"judges": ["verifier", "self"], "judge_max_new_tokens": 8}})
    judge = build_llm_judge(config, tiny_model_dir, Path.cwd())
    assert judge.name == "self" and judge.source == str(tiny_model_dir)
    verdicts = judge.judge([(LOWER, "green tea")])
    # a tiny random model writes no verdict line: that is no verdict, never a guess
    assert len(verdicts) == 1 and verdicts[0].passed is None and verdicts[0].judge == "self"


def test_missing_local_teacher_is_a_judge_error(tmp_path):
    config = parse_config({"feedback": {"judges": ["verifier", "teacher"], "teacher": {"model": "./gone"}}})
    with pytest.raises(JudgeError, match=r"^teacher judge \(.*gone\): cannot load the model"):
        build_llm_judge(config, tmp_path, tmp_path)


# --- the stage, against a fake OpenAI-compatible teacher --------------------------------------------------------------

def _round(tmp_path: Path):
    import pandas as pd

    from flywheel.dataset import write_parquet
    from flywheel.stages import Champion, Generations, PromptSplit, RoundContext

    work = tmp_path / "work"
    work.mkdir()
    save_prompts(PROMPTS, tmp_path / "prompts.jsonl")
    write_parquet(pd.DataFrame([c.model_dump() for c in COMPLETIONS]), work / "generations.parquet")
    context = RoundContext(number=1, name="round-0001", data_dir=str(tmp_path / "data"), work_dir=str(work),
                           run_id="run", config_hash="hash",
                           champion=Champion(version="1", path=str(tmp_path / "no-model"), sha256=""))
    split = PromptSplit(train_path=str(tmp_path / "prompts.jsonl"), eval_path=str(tmp_path / "eval.jsonl"),
                        train=2, eval=0, round_prompts=2)
    generations = Generations(path=str(work / "generations.parquet"), prompts=2, samples=len(COMPLETIONS),
                              tokens=10, seconds=1.0, tokens_per_second=10.0)
    return context, split, generations


def _teacher_config(url: str, **feedback):
    return parse_config({
        "feedback": {"judges": ["verifier", "teacher"], "llm_scope": "all",
                     "teacher": {"base_url": url, "model": "judge-model", "backoff_s": 0, "retries": 1,
                                 "timeout_s": 5}, **feedback},
        "quality": {"max_failed_fraction": 0.2},
    })


def test_judge_samples_with_verifier_and_teacher_endpoint(tmp_path):
    from flywheel.dataset import read_table
    from flywheel.stages import judge_samples

    context, split, generations = _round(tmp_path)
    with fake_openai(lambda body, call: chat_answer([lowercase_teacher(user_text(body))])) as server:
        judged = judge_samples(_teacher_config(server.url), context, split, generations)
    assert server.calls == 5 and {b["model"] for b in server.bodies} == {"judge-model"}
    table = read_table(Path(judged.path))
    assert list(table.columns) == SAMPLE_COLUMNS
    assert table["judge"].tolist() == ["teacher"] * 5
    assert table["verdict"].tolist() == ["pass" if case[2] else "fail" for case in CASES]
    assert all(table["critique"].str.startswith("The response is"))
    assert judged.agreement == pytest.approx(3 / 5) and judged.agreement_rows == 5
    assert judged.judges == ["verifier", "teacher"] and judged.no_verdict == 0
    assert judged.pass_rate == pytest.approx(3 / 5)


def test_judge_samples_stops_when_the_teacher_gives_no_verdict(tmp_path):
    from flywheel.stages import judge_samples

    context, split, generations = _round(tmp_path)
    no_verdict = chat_answer(["Looks fine to me."])
    with fake_openai(lambda body, call: no_verdict) as server, pytest.raises(JudgeError) as caught:
        judge_samples(_teacher_config(server.url), context, split, generations)
    message = str(caught.value)
    assert message.startswith(f"teacher judge ({server.url} model judge-model): no verdict for 5 of 5 rows")
    assert "\n" not in message
    assert not (Path(context.work_dir) / "samples.parquet").exists()  # nothing written


def test_judge_samples_names_the_endpoint_when_it_returns_garbage(tmp_path):
    from flywheel.stages import judge_samples

    context, split, generations = _round(tmp_path)
    with fake_openai(lambda body, call: "<html>502 bad gateway</html>") as server, \
            pytest.raises(JudgeError) as caught:
        judge_samples(_teacher_config(server.url), context, split, generations)
    source = f"teacher judge ({server.url} model judge-model)"
    assert str(caught.value).startswith(f"{source}: {server.url}/chat/completions:")
    assert "not JSON" in str(caught.value)
    assert not (Path(context.work_dir) / "samples.parquet").exists()


def test_judge_verdict_is_typed():
    with pytest.raises(ValueError):
        JudgeVerdict(score=1.5, passed=True, critique="", judge="verifier")


def test_human_judge_imports_the_review_decision():
    from flywheel.judges import HumanJudge
    from flywheel.review import ReviewDecision, auto_decision

    rows = [{"row_id": "p-short-sft0", "prompt_id": "p-short", "completion": "a ripe apple"},
            {"row_id": "p-short-sft1", "prompt_id": "p-short", "completion": "apple, pear"},
            {"row_id": "p-lower-sft0", "prompt_id": "p-lower", "completion": "green tea"}]
    decision = ReviewDecision(approved=True, mode="human", reviewer="alice", notes="commas slipped through",
                              sample_ids=["p-short-sft0", "p-short-sft1"], dropped_ids=["p-short-sft1"])
    judge = HumanJudge.from_review(decision, rows)
    verdicts = judge.judge([(SHORT, "a ripe apple "), (SHORT, "apple, pear"), (LOWER, "green tea")])
    assert [v.passed for v in verdicts] == [True, False, None]  # the last row was not shown to the reviewer
    assert verdicts[1].critique == "Dropped in review by alice: commas slipped through"
    assert all(v.judge == "human" for v in verdicts)
    automatic = HumanJudge.from_review(auto_decision(["p-short-sft0"]), rows)
    assert automatic.judge([(SHORT, "a ripe apple")])[0].passed is None  # a policy's approval is no human verdict


def test_close_round_logs_agreement_as_a_metric(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from flywheel import stages

    logged: dict[str, float] = {}
    monkeypatch.setattr(stages, "log_metrics", lambda workspace, run_id, metrics, step=0: logged.update(metrics))
    monkeypatch.setattr(stages, "write_round_record", lambda workspace, record: tmp_path / "record.json")
    monkeypatch.setattr(stages.registry, "client", lambda uri: SimpleNamespace(
        log_artifact=lambda *args, **kwargs: None, set_terminated=lambda *args, **kwargs: None))
    workspace, context = SimpleNamespace(tracking_uri="unused"), SimpleNamespace(run_id="run")

    def record(agreement):
        judged = stages.JudgedSamples(path="s", rows=5, pass_rate=0.6, mean_score=0.6, no_verdict=1,
                                      agreement=agreement, agreement_rows=4 if agreement is not None else 0)
        return SimpleNamespace(generations=SimpleNamespace(tokens_per_second=1.0, seconds=1.0), judged=judged,
                               quality=SimpleNamespace(clean=SimpleNamespace(pairs=1, sft=2)))

    stages.close_round(workspace, context, record(0.75))
    assert logged["judge.agreement"] == 0.75 and logged["judge.no_verdict"] == 1
    logged.clear()
    stages.close_round(workspace, context, record(None))
    assert "judge.agreement" not in logged and logged["judge.pass_rate"] == 0.6
