import json

import pytest

from flywheel.config import ConfigError, load_config, parse_config
from flywheel.generation import Completion
from flywheel.open_ended import (
    BUILTIN_OPEN_ENDED,
    OpenEndedError,
    OpenEndedPrompt,
    judge_pairs,
    load_open_ended,
    outcome,
    parse_winner,
    summarize_pairs,
)


class FakeEngine:
    """Answers each request with a function of its text; records the requests."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[str] = []

    def generate(self, requests, samples, params, progress=None):
        assert samples == 1 and params.temperature == 0  # comparisons are greedy
        texts = [r.messages[-1]["content"] for r in requests]
        self.requests.extend(texts)
        return [Completion(request_index=i, sample_index=0, text=self.reply(t), n_tokens=3, finished=True)
                for i, t in enumerate(texts)]


def _answers(text: str) -> tuple[str, str]:
    first = text.split("ANSWER A:\n", 1)[1].split("\n\nANSWER B:", 1)[0]
    second = text.split("ANSWER B:\n", 1)[1].split("\n\nWhich answer", 1)[0]
    return first, second


@pytest.mark.parametrize("text,winner", [
    ("A is clearer.\nWINNER: A", "A"),
    ("b covers more\nwinner: b", "B"),
    ("Reason.\n**Winner:** B.", "B"),
    ("Reason.\nWINNER: Answer A", "A"),
    ("WINNER: A\nbut on reflection B is better", None),  # not on the last line
    ("Both are fine.", None),
    ("Reason.\nWINNER: C", None),
    ("Reason.\nWINNER: A or B", None),
    ("", None),
])
def test_parse_winner(text, winner):
    assert parse_winner(text) == winner


def test_a_win_needs_the_same_answer_picked_in_both_orders():
    assert outcome("A", "B") == "win"    # candidate first and picked; champion first and the other picked
    assert outcome("B", "A") == "loss"
    assert outcome("A", "A") == "tie"    # always the first answer: position bias, not a preference
    assert outcome("B", "B") == "tie"
    assert outcome(None, "B") == "tie"


PROMPTS = [OpenEndedPrompt(id=f"p{n}", prompt=f"request {n}") for n in range(4)]


def test_judge_pairs_asks_both_orders_and_cancels_position_bias():
    always_first = FakeEngine(lambda text: "The first.\nWINNER: A")
    verdicts = judge_pairs(always_first, PROMPTS, ["c"] * 4, ["h"] * 4)
    assert len(always_first.requests) == 8
    assert [_answers(t) for t in always_first.requests[:2]] == [("c", "h"), ("h", "c")]
    assert {v.outcome for v in verdicts} == {"tie"}
    result = summarize_pairs(verdicts, "self", "model", "builtin")
    assert (result.wins, result.losses, result.ties, result.win_rate) == (0, 0, 4, 0.5)


def test_judge_pairs_counts_a_consistent_preference():
    # Prefers the longer answer, wherever it is shown.
    def longer(text):
        first, second = _answers(text)
        return "Longer is better.\nWINNER: " + ("A" if len(first) > len(second) else "B")

    candidate = ["a long, careful answer", "x", "another long answer", "y"]
    champion = ["short", "a much longer answer here", "short", "z"]
    verdicts = judge_pairs(FakeEngine(longer), PROMPTS, candidate, champion)
    assert [v.outcome for v in verdicts] == ["win", "loss", "win", "tie"]  # equal lengths: B both times, a tie
    result = summarize_pairs(verdicts, "teacher", "http://x model m", "builtin")
    assert (result.wins, result.losses, result.ties) == (2, 1, 1)
    assert result.win_rate == pytest.approx((2 + 0.5) / 4)


def test_judge_pairs_needs_one_answer_per_prompt():
    with pytest.raises(ValueError, match="one candidate and one champion answer per prompt"):
        judge_pairs(FakeEngine(lambda t: ""), PROMPTS, ["a"], ["b"] * 4)


def test_builtin_prompts_are_distinct_and_limited():
    prompts = load_open_ended("builtin", 1000)
    assert len(prompts) == len(BUILTIN_OPEN_ENDED) >= 32
    assert len({p.id for p in prompts}) == len(prompts)
    assert [p.prompt for p in load_open_ended("builtin", 3)] == list(BUILTIN_OPEN_ENDED[:3])
    with pytest.raises(OpenEndedError, match="limit must be at least 1"):
        load_open_ended("builtin", 0)


def test_prompt_file_loads_and_bad_files_are_named(tmp_path):
    good = tmp_path / "open.jsonl"
    good.write_text("".join(json.dumps({"id": f"q{n}", "prompt": f"Tell me about {n}."}) + "\n" for n in range(3))
                    + "\n")
    assert [p.id for p in load_open_ended(str(good), 2)] == ["q0", "q1"]
    assert len(load_open_ended("open.jsonl", 10, base_dir=tmp_path)) == 3
    with pytest.raises(OpenEndedError, match="open-ended prompt file not found"):
        load_open_ended(str(tmp_path / "none.jsonl"), 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b"}\n')
    with pytest.raises(OpenEndedError, match=r"bad.jsonl, line 2: not an open-ended prompt"):
        load_open_ended(str(bad), 3)
    bad.write_text("not json\n")
    with pytest.raises(OpenEndedError, match="line 1"):
        load_open_ended(str(bad), 3)
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(OpenEndedError, match="duplicate prompt ids"):
        load_open_ended(str(bad), 3)
    bad.write_text("\n")
    with pytest.raises(OpenEndedError, match="no open-ended prompts"):
        load_open_ended(str(bad), 3)


def test_config_checks_the_open_ended_judge_and_file(tmp_path):
    config = parse_config({"evaluation": {"open_ended": 8}})
    assert config.evaluation.open_ended_judge == "self" and config.evaluation.open_ended_prompts == "builtin"
    with pytest.raises(ConfigError, match="open_ended_judge 'teacher' needs a feedback.teacher section"):
        parse_config({"evaluation": {"open_ended": 8, "open_ended_judge": "teacher"}})
    with pytest.raises(ConfigError, match="open_ended_judge"):
        parse_config({"evaluation": {"open_ended_judge": "verifier"}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("evaluation:\n  open_ended: 4\n  open_ended_prompts: missing.jsonl\n")
    with pytest.raises(ConfigError, match="evaluation.open_ended_prompts: file not found"):
        load_config(recipe, base_dir=tmp_path)


@pytest.mark.usefixtures("one_torch_thread")
def test_open_ended_comparison_on_a_tiny_model(tiny_model_dir, tmp_path):
    from flywheel.dataset import read_table
    from flywheel.stages import open_ended_comparison

    config = parse_config({"evaluation": {"open_ended": 3, "max_new_tokens": 6},
                           "feedback": {"judge_max_new_tokens": 8}})
    rows = tmp_path / "open.parquet"
    result = open_ended_comparison(config, tmp_path, tmp_path / "state", tiny_model_dir, tiny_model_dir,
                                   rows_path=rows)
    assert result.prompts == 3 and result.wins + result.losses + result.ties == 3
    assert result.judge == "self" and result.source == str(tiny_model_dir) and result.prompt_source == "builtin"
    table = read_table(rows)
    assert list(table["prompt"]) == list(BUILTIN_OPEN_ENDED[:3])
    assert list(table["candidate"]) == list(table["champion"])  # one model against itself, greedy
    assert set(table["outcome"]) <= {"win", "loss", "tie"}
    with pytest.raises(ValueError, match="need an LLM judge"):
        open_ended_comparison(config, tmp_path, tmp_path / "state", tiny_model_dir, tiny_model_dir, judge="verifier")
