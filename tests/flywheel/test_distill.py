from collections.abc import Callable
from pathlib import Path

import pytest
from fake_openai import chat_answer, fake_openai, user_text

from flywheel.config import DistillConfig, TeacherConfig
from flywheel.dataset import SFT_COLUMNS
from flywheel.distill import DistillError, distill, make_teacher_engine
from flywheel.generation import Completion, EngineError, SamplingParams, TransformersEngine
from flywheel.judges import JudgeVerdict, VerifierJudge
from flywheel.prompts import Prompt, default_prompts
from flywheel.verifiers import Constraint

LOWER = Prompt(id="p-lower", prompt="Describe tea. Answer in lowercase.",
               constraints=[Constraint(type="all_lowercase")])
SHORT = Prompt(id="p-short", prompt="Name a fruit in at most three words, without commas.",
               constraints=[Constraint(type="word_count_max", args={"max_words": 3}), Constraint(type="no_commas")])
SFT_TABLE = SFT_COLUMNS + ["origin", "judge", "guideline", "teacher", "ended"]


class FakeEngine:
    """Answers every request with ``answer(user text)`` and records each generate call."""

    def __init__(self, answer: Callable[[str], str], cut_off: Callable[[str], bool] = lambda answer: False):
        self.answer = answer
        self.cut_off = cut_off  # whether the token limit cut that answer off
        self.calls: list[tuple[list[str], int, SamplingParams]] = []

    def generate(self, requests, samples, params, progress=None):
        texts = [r.messages[-1]["content"] for r in requests]
        self.calls.append((texts, samples, params))
        out = [Completion(request_index=i, sample_index=s, text=self.answer(t), n_tokens=len(self.answer(t).split()),
                          finished=not self.cut_off(self.answer(t)))
               for i, t in enumerate(texts) for s in range(samples)]
        if progress:
            progress(len(out))
        return out


def _options(require_pass: bool = True, **more) -> DistillConfig:
    return DistillConfig(teacher=TeacherConfig(model="./teacher"), require_pass=require_pass, **more)


def _student() -> FakeEngine:
    # The guideline names the request it was written for, so the test can see which one the teacher got.
    return FakeEngine(lambda text: f"GUIDE[{'tea' if 'Describe tea' in text else 'fruit'}]: be brief")


def _run(teacher, prompts=(LOWER, SHORT), options=None, **kwargs):
    student = kwargs.pop("student", _student())
    result = distill(list(prompts), student, teacher, options or _options(), answer_max_new_tokens=24,
                     temperature=0.7, top_p=0.9, seed=5, teacher_source="teacher-dir", **kwargs)
    return student, result


def test_teacher_sees_guideline_and_prompt_but_the_row_has_the_original_prompt():
    teacher = FakeEngine(lambda text: "green tea is calm" if "Describe tea" in text else "an apple")
    progress: list[int] = []
    student, result = _run(teacher, options=_options(guideline_max_new_tokens=12), progress=progress.append)

    # one generate call per phase, guidelines greedy with their own token budget, one answer per prompt
    assert len(student.calls) == 1 and len(teacher.calls) == 1 and sum(progress) == 4
    guide_texts, guide_samples, guide_params = student.calls[0]
    assert guide_samples == 1 and guide_params.temperature == 0.0 and guide_params.max_new_tokens == 12
    assert LOWER.prompt in guide_texts[0] and "requirements a good answer must meet" in guide_texts[0]
    answer_texts, answer_samples, answer_params = teacher.calls[0]
    assert answer_samples == 1 and answer_params == SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9,
                                                                   seed=5)
    assert LOWER.prompt in answer_texts[0] and "Guideline from a reviewer:\nGUIDE[tea]: be brief" in answer_texts[0]
    assert SHORT.prompt in answer_texts[1] and "GUIDE[fruit]" in answer_texts[1]
    assert "Answer the request." in answer_texts[1]

    sft = result.sft
    assert list(sft.columns) == SFT_TABLE and len(sft) == 2
    assert list(sft["prompt"]) == [LOWER.prompt, SHORT.prompt]  # the original request, no guideline
    assert not sft["prompt"].str.contains("Guideline|GUIDE").any()
    assert list(sft["completion"]) == ["green tea is calm", "an apple"]
    assert list(sft["row_id"]) == ["p-lower-distill", "p-short-distill"] and sft["row_id"].is_unique
    assert list(sft["score"]) == [1.0, 1.0] and sft["score"].dtype == "float64"
    assert set(sft["origin"]) == {"distill:teacher"} and set(sft["judge"]) == {"none"}
    assert set(sft["teacher"]) == {"teacher-dir"}
    assert list(sft["guideline"]) == ["GUIDE[tea]: be brief", "GUIDE[fruit]: be brief"]
    assert result.guidelines.to_dict("records") == [
        {"prompt_id": "p-lower", "guideline": "GUIDE[tea]: be brief", "n_tokens": 3},
        {"prompt_id": "p-short", "guideline": "GUIDE[fruit]: be brief", "n_tokens": 3},
    ]
    assert result.stats == {"prompts": 2.0, "answers": 2.0, "empty_answers": 0.0, "passed": 2.0, "kept": 2.0,
                            "pass_rate": 1.0, "mean_guideline_tokens": 3.0}


def test_rows_record_whether_the_teacher_answer_was_cut_off():
    teacher = FakeEngine(lambda text: "green tea is calm" if "Describe tea" in text else "an apple",
                         cut_off=lambda answer: answer == "an apple")
    _, result = _run(teacher)
    assert result.sft["ended"].dtype == bool
    assert dict(zip(result.sft["completion"], result.sft["ended"])) == {"green tea is calm": True, "an apple": False}


def test_require_pass_keeps_only_answers_the_verifier_accepts():
    # LOWER's answer is all lowercase (passes); SHORT's has too many words and a comma (fails both checks).
    teacher = FakeEngine(lambda text: "green tea is calm" if "Describe tea" in text else "An apple, a pear and a plum")
    _, strict = _run(teacher, judge=VerifierJudge())
    assert list(strict.sft["prompt_id"]) == ["p-lower"] and list(strict.sft["score"]) == [1.0]
    assert list(strict.sft["judge"]) == ["verifier"]
    assert strict.stats["passed"] == 1.0 and strict.stats["kept"] == 1.0 and strict.stats["pass_rate"] == 0.5
    assert len(strict.guidelines) == 2  # every guideline is recorded, kept or not

    _, loose = _run(teacher, options=_options(require_pass=False), judge=VerifierJudge())
    assert list(loose.sft["prompt_id"]) == ["p-lower", "p-short"]
    assert loose.sft["score"].tolist() == [1.0, 0.0] and loose.stats["pass_rate"] == 0.5


def test_no_verdict_is_not_a_pass():
    class Undecided:
        name, source = "teacher", "fake"

        def judge(self, items):
            return [JudgeVerdict(score=0.4, passed=None, critique="?", judge=self.name) for _ in items]

    _, result = _run(FakeEngine(lambda text: "an answer"), judge=Undecided())
    assert result.sft.empty and list(result.sft.columns) == SFT_TABLE and result.stats["passed"] == 0.0
    _, loose = _run(FakeEngine(lambda text: "an answer"), options=_options(require_pass=False), judge=Undecided())
    assert loose.sft["score"].tolist() == [0.4, 0.4] and set(loose.sft["judge"]) == {"teacher"}


@pytest.mark.parametrize("require_pass", [True, False])
def test_empty_teacher_answers_are_never_kept(require_pass):
    teacher = FakeEngine(lambda text: "  \n " if "Describe tea" in text else "an apple")
    _, result = _run(teacher, options=_options(require_pass=require_pass))
    assert list(result.sft["prompt_id"]) == ["p-short"]
    assert result.stats["empty_answers"] == 1.0 and result.stats["kept"] == 1.0
    # and a judge never sees them: with the verifier, the empty answer is not judged either
    _, judged = _run(teacher, options=_options(require_pass=require_pass), judge=VerifierJudge())
    assert "p-lower" not in set(judged.sft["prompt_id"])


def test_bad_input_and_engine_failures_are_one_line_errors():
    with pytest.raises(DistillError, match="duplicate prompt id 'p-lower'"):
        _run(FakeEngine(lambda text: "x"), prompts=(LOWER, LOWER))

    class Broken(FakeEngine):
        def generate(self, requests, samples, params, progress=None):
            raise EngineError("http://x/v1: HTTP 500 (gave up after 3 attempts)")

    with pytest.raises(DistillError, match=r"^distill teacher \(teacher-dir\): http://x/v1: HTTP 500"):
        _run(Broken(lambda text: ""))
    _, empty = _run(FakeEngine(lambda text: "x"), prompts=())
    assert empty.sft.empty and empty.guidelines.empty and empty.stats["prompts"] == 0.0


def test_local_teacher_folder_resolves_against_base_dir(tiny_model_dir, tmp_path):
    engine, source = make_teacher_engine(TeacherConfig(model=f"./{tiny_model_dir.name}"), tiny_model_dir.parent,
                                         "cpu", 4)
    assert isinstance(engine, TransformersEngine) and source == str(tiny_model_dir)
    # the policy's endpoint serves only the policy: a local teacher then runs on transformers
    engine, _ = make_teacher_engine(TeacherConfig(model=str(tiny_model_dir)), tmp_path, "cpu", 4, engine="openai")
    assert isinstance(engine, TransformersEngine)

    with pytest.raises(DistillError, match=r"^distill teacher \(.*gone\): model folder not found$"):
        make_teacher_engine(TeacherConfig(model="./gone"), tmp_path, "cpu", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError) as error:
        make_teacher_engine(TeacherConfig(model="./empty"), tmp_path, "cpu", 4)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"distill teacher ({tmp_path / 'empty'}): "
                                                                        "cannot load the model")


def test_endpoint_teacher_answers_through_the_openai_engine(monkeypatch):
    def reply(body: dict, call: int) -> dict:
        return chat_answer([" served: green tea " if "Describe tea" in user_text(body) else "served: apple"],
                           completion_tokens=3)

    with fake_openai(reply) as server:
        teacher = TeacherConfig(model="big-teacher", base_url=server.url, retries=0, timeout_s=5)
        engine, source = make_teacher_engine(teacher, Path("unused"), "cpu", 4)
        assert source == f"{server.url} model big-teacher"
        result = distill([LOWER, SHORT], _student(), engine, _options(), answer_max_new_tokens=16,
                            temperature=0.0, top_p=1.0, seed=0, teacher_source=source)
    assert server.calls == 2 and {b["model"] for b in server.bodies} == {"big-teacher"}
    assert all("Guideline from a reviewer:\nGUIDE[" in user_text(b) for b in server.bodies)
    assert list(result.sft["completion"]) == ["served: green tea", "served: apple"]
    assert set(result.sft["teacher"]) == {source}

    monkeypatch.delenv("FLYWHEEL_NO_SUCH_KEY", raising=False)
    with pytest.raises(DistillError, match=r"^distill teacher \(http://127\.0\.0\.1:9/v1 model m\): .*FLYWHEEL_NO"):
        make_teacher_engine(TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1",
                                          api_key_env="FLYWHEEL_NO_SUCH_KEY"), Path(), "cpu", 4)


def test_end_to_end_on_the_tiny_model(tiny_model_dir):
    prompts = default_prompts(seed=0)[:3]
    student = TransformersEngine(tiny_model_dir, device="cpu", batch_size=4)
    teacher, source = make_teacher_engine(TeacherConfig(model=str(tiny_model_dir)), Path.cwd(), "cpu", 4)
    options = _options(require_pass=False, guideline_max_new_tokens=6)
    result = distill(prompts, student, teacher, options, judge=VerifierJudge(), answer_max_new_tokens=8,
                     temperature=0.8, top_p=0.95, seed=1, teacher_source=source)

    guidelines = result.guidelines
    assert list(guidelines.columns) == ["prompt_id", "guideline", "n_tokens"]
    assert list(guidelines["prompt_id"]) == [p.id for p in prompts]
    assert guidelines["n_tokens"].dtype == "int64" and guidelines["n_tokens"].between(0, 6).all()
    assert guidelines["guideline"].map(type).eq(str).all()

    sft = result.sft
    assert list(sft.columns) == SFT_TABLE and len(sft) >= 1  # without require_pass, non-empty answers are kept
    by_prompt = dict(zip(guidelines["prompt_id"], guidelines["guideline"]))
    assert [by_prompt[i] for i in sft["prompt_id"]] == list(sft["guideline"])
    assert sft["score"].dtype == "float64" and sft["score"].between(0, 1).all()
    assert set(sft["prompt"]) <= {p.prompt for p in prompts} and sft["row_id"].is_unique
    assert (sft["completion"].str.strip() != "").all()
    assert set(sft["judge"]) <= {"verifier"} and set(sft["teacher"]) <= {str(tiny_model_dir)}
    stats = result.stats
    assert set(stats) >= {"prompts", "answers", "kept", "pass_rate", "mean_guideline_tokens"}
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["prompts"] == 3.0 and stats["kept"] == len(sft) == stats["answers"] - stats["empty_answers"]
    assert stats["mean_guideline_tokens"] == pytest.approx(guidelines["n_tokens"].mean())
