import json

import pytest

from flywheel.feedback import SAMPLE_COLUMNS, judge_with_verifiers
from flywheel.generation import Completion
from flywheel.prompts import Prompt
from flywheel.verifiers import Constraint

PROMPTS = [
    Prompt(id="p-lower", prompt="Describe tea. Answer in lowercase.", constraints=[Constraint(type="all_lowercase")]),
    Prompt(
        id="p-short",
        prompt="Name a fruit in at most three words, without commas.",
        constraints=[Constraint(type="word_count_max", args={"max_words": 3}), Constraint(type="no_commas")],
    ),
]


def _completion(request: int, sample: int, text: str, finished: bool = True) -> Completion:
    return Completion(request_index=request, sample_index=sample, text=text, n_tokens=len(text.split()),
                      finished=finished)


COMPLETIONS = [
    _completion(0, 0, "green tea is calm."),  # lowercase: passes
    _completion(0, 1, "Green tea is calm."),  # a capital: fails
    _completion(1, 0, "a ripe apple"),  # both pass
    _completion(1, 1, "apples, pears and plums", finished=False),  # too long and a comma: fails both
    _completion(1, 2, "apple, pear"),  # short but a comma: half
]


@pytest.fixture
def judged():
    return judge_with_verifiers(PROMPTS, COMPLETIONS)


def test_columns_and_one_row_per_completion(judged):
    assert list(judged.columns) == SAMPLE_COLUMNS
    assert len(judged) == len(COMPLETIONS)
    assert list(judged["row_id"]) == ["p-lower-s0", "p-lower-s1", "p-short-s0", "p-short-s1", "p-short-s2"]
    assert list(judged["prompt_id"]) == ["p-lower", "p-lower", "p-short", "p-short", "p-short"]
    assert list(judged["prompt"]) == [PROMPTS[0].prompt] * 2 + [PROMPTS[1].prompt] * 3
    assert list(judged["response"]) == [c.text for c in COMPLETIONS]
    assert list(judged["sample_index"]) == [0, 1, 0, 1, 2]
    assert list(judged["finished"]) == [True, True, True, False, True]
    assert list(judged["n_tokens"]) == [c.n_tokens for c in COMPLETIONS]


def test_scores_and_pass_flags(judged):
    assert list(judged["score"]) == [1.0, 0.0, 1.0, 0.0, 0.5]
    assert list(judged["passed"]) == [True, False, True, False, False]
    assert judged["score"].dtype == float and judged["passed"].dtype == bool


def test_checks_record_each_constraint(judged):
    checks = [json.loads(c) for c in judged["checks"]]
    assert checks[0] == {"all_lowercase": True}
    assert checks[1] == {"all_lowercase": False}
    assert checks[3] == {"word_count_max": False, "no_commas": False}
    assert checks[4] == {"word_count_max": True, "no_commas": False}


def test_loose_mode_accepts_markdown_variants():
    bold = [_completion(0, 0, "**green tea**")]  # strict: '*' is no letter, still lowercase
    titled = [_completion(0, 0, "Tea Notes\ngreen tea is calm.")]  # first line dropped in loose mode
    assert judge_with_verifiers(PROMPTS, bold)["passed"].tolist() == [True]
    assert judge_with_verifiers(PROMPTS, titled, strict=True)["passed"].tolist() == [False]
    assert judge_with_verifiers(PROMPTS, titled, strict=False)["passed"].tolist() == [True]


def test_empty_answer_fails_and_no_completions_gives_an_empty_table():
    blank = judge_with_verifiers(PROMPTS, [_completion(0, 0, "")])
    assert blank["score"].tolist() == [0.0] and blank["passed"].tolist() == [False]
    empty = judge_with_verifiers(PROMPTS, [])
    assert empty.empty and list(empty.columns) == SAMPLE_COLUMNS
