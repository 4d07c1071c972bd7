import hashlib
import json
from collections import Counter

import pandas as pd
import pytest

from flywheel.prompts import (
    DEFAULT_PROMPT_COUNT,
    MAX_PROMPT_CHARS,
    TASKS,
    Prompt,
    PromptFileError,
    default_prompts,
    load_prompts,
    normalize_prompt_text,
    sample_round_prompts,
    save_prompts,
    split_prompts,
    synthesize_prompts,
)
from flywheel.verifiers import VERIFIERS, Constraint, compatible


@pytest.fixture(scope="module")
def defaults() -> list[Prompt]:
    return default_prompts()


def make_prompt(prompt_id: str, text: str | None = None, topic: str = "") -> Prompt:
    return Prompt(id=prompt_id, prompt=text or f"Describe item {prompt_id}. Answer in lowercase.",
                  constraints=[Constraint(type="all_lowercase")], topic=topic)


# --------------------------------------------------------------------------------------------------------------
# Synthesis


def test_synthesis_is_deterministic_and_seeded():
    first = synthesize_prompts(40, seed=3)
    assert first == synthesize_prompts(40, seed=3)
    other = synthesize_prompts(40, seed=4)
    assert {p.id for p in first} != {p.id for p in other}


def test_smaller_set_is_a_prefix_of_a_larger_one():
    assert synthesize_prompts(10, seed=1) == synthesize_prompts(30, seed=1)[:10]


def test_default_prompts(defaults):
    assert DEFAULT_PROMPT_COUNT == 256
    assert len(defaults) == 256
    assert defaults == synthesize_prompts(256, seed=0)
    assert len(synthesize_prompts(7, seed=9)) == 7
    assert synthesize_prompts(0) == []


def test_a_larger_builtin_pool_keeps_the_default_pool_and_its_held_out_prompts(defaults, tmp_path):
    from flywheel.config import PromptsConfig
    from flywheel.prompts import recipe_prompts

    larger = recipe_prompts(PromptsConfig(builtin_count=1024), tmp_path)
    assert len(larger) == 1024 and larger[:256] == defaults
    _, held_out = split_prompts(defaults, 0.25)
    _, more_held_out = split_prompts(larger, 0.25)
    # Every eval_limit scores a prefix of the same held-out order, so a larger pool only adds prompts.
    assert more_held_out[: len(held_out)] == held_out and len(more_held_out) > 3 * len(held_out)
    assert recipe_prompts(PromptsConfig(), tmp_path) == defaults


def test_recipe_prompts_reads_a_file_source(tmp_path):
    from flywheel.config import PromptsConfig
    from flywheel.prompts import recipe_prompts

    save_prompts([make_prompt("a"), make_prompt("b")], tmp_path / "mine.jsonl")
    assert [p.id for p in recipe_prompts(PromptsConfig(source="mine.jsonl"), tmp_path)] == ["a", "b"]


def test_ids_are_unique_and_content_derived(defaults):
    assert len({p.id for p in defaults}) == len(defaults)
    assert len({p.prompt for p in defaults}) == len(defaults)
    for prompt in defaults:
        assert prompt.id == "syn-" + hashlib.sha1(prompt.prompt.encode()).hexdigest()[:12]


def test_prompt_text_is_task_plus_instruction_sentences(defaults):
    for prompt in defaults:
        assert prompt.topic in TASKS
        expected = " ".join([prompt.topic, *(VERIFIERS[c.type].describe(c.args) for c in prompt.constraints)])
        assert prompt.prompt == expected
        for constraint in prompt.constraints:
            assert constraint.describe() in prompt.prompt
            if constraint.type == "repeat_request":
                assert constraint.args["prompt_to_repeat"] == prompt.topic


def test_constraints_are_compatible_valid_and_bounded(defaults):
    counts = Counter(len(p.constraints) for p in defaults)
    assert set(counts) == {1, 2, 3}
    for prompt in defaults:
        types = [c.type for c in prompt.constraints]
        assert compatible(types), types
        for constraint in prompt.constraints:
            assert Constraint.model_validate(constraint.model_dump()) == constraint
    assert all(len(p.constraints) == 1 for p in synthesize_prompts(30, seed=2, max_constraints=1))


def test_easy_types_are_drawn_more_often_than_hard_ones(defaults):
    counts = Counter(c.type for p in defaults for c in p.constraints)
    assert set(counts) == set(VERIFIERS)  # the default set exercises every verifier
    for easy in ("all_lowercase", "no_commas", "word_count_max", "title", "postscript"):
        for hard in ("json_format", "section_count", "two_responses", "response_language"):
            assert counts[easy] > counts[hard], (easy, hard)


def test_sampled_arguments_never_contradict_each_other():
    # A forbidden word must not also be a required keyword, phrase or word in the same prompt.
    for prompt in synthesize_prompts(1500, seed=5):
        forbidden = [c for c in prompt.constraints if c.type == "forbidden_words"]
        if not forbidden:
            continue
        required = " ".join(
            value if isinstance(value, str) else " ".join(value)
            for c in prompt.constraints if c.type != "forbidden_words"
            for value in c.args.values() if isinstance(value, (str, list))
        )
        assert not required.strip() or forbidden[0].check(required), prompt.prompt


def test_tasks_are_varied_and_free_of_digits_and_commas():
    assert len(TASKS) >= 60
    assert len(set(TASKS)) == len(TASKS)
    for task in TASKS:
        assert task.endswith(".")
        assert not any(char.isdigit() for char in task) and "," not in task, task


def test_synthesis_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be >= 0"):
        synthesize_prompts(-1)
    with pytest.raises(ValueError, match="max_constraints must be >= 1"):
        synthesize_prompts(5, max_constraints=0)


def test_prompt_model_validation():
    with pytest.raises(ValueError, match="id"):
        make_prompt("  ")
    with pytest.raises(ValueError, match="constraints"):
        Prompt(id="a", prompt="Say hi.", constraints=[])
    with pytest.raises(ValueError, match="prompt"):
        Prompt(id="a", prompt="x" * (MAX_PROMPT_CHARS + 1), constraints=[Constraint(type="title")])


# --------------------------------------------------------------------------------------------------------------
# Files

ODD_PROMPT = Prompt(
    id="odd-1",
    prompt='Say "hi", then\na line break — and ünïcödé\u2028too.',
    constraints=[Constraint(type="keywords_include", args={"keywords": ["hi", "tea"]}),
                 Constraint(type="postscript", args={"marker": "P.P.S."})],
    topic="greetings, quoted",
)


def _frame(prompts: list[Prompt]) -> pd.DataFrame:
    return pd.DataFrame([
        {"id": p.id, "prompt": p.prompt, "constraints": json.dumps([c.model_dump() for c in p.constraints]),
         "topic": p.topic}
        for p in prompts
    ])


def test_jsonl_round_trip(tmp_path, defaults):
    prompts = [*defaults[:20], ODD_PROMPT]
    path = tmp_path / "nested" / "prompts.jsonl"
    save_prompts(prompts, path)
    assert load_prompts(path) == prompts
    assert len(path.read_text(encoding="utf-8").splitlines()) >= len(prompts)


def test_csv_round_trip(tmp_path, defaults):
    prompts = [*defaults[:20], ODD_PROMPT]
    path = tmp_path / "prompts.csv"
    _frame(prompts).to_csv(path, index=False)
    assert load_prompts(path) == prompts


def test_parquet_round_trip(tmp_path, defaults):
    prompts = [*defaults[:20], ODD_PROMPT]
    path = tmp_path / "prompts.parquet"
    _frame(prompts).to_parquet(path, index=False)
    assert load_prompts(path) == prompts


def test_topic_is_optional(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt,constraints\na,Say hi.,"[{""type"": ""title""}]"\n', encoding="utf-8")
    assert load_prompts(path) == [Prompt(id="a", prompt="Say hi.", constraints=[Constraint(type="title")])]


def test_save_rejects_what_cannot_be_loaded_back(tmp_path):
    with pytest.raises(ValueError, match=r"\.jsonl"):
        save_prompts([make_prompt("a")], tmp_path / "p.csv")
    with pytest.raises(ValueError, match="no prompts"):
        save_prompts([], tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="duplicate prompt id 'a'"):
        save_prompts([make_prompt("a"), make_prompt("a", "Other text.")], tmp_path / "p.jsonl")


def _line(**record) -> str:
    return json.dumps(record)


GOOD = {"id": "a", "prompt": "Say hi.", "constraints": [{"type": "title"}]}
LOWER = [{"type": "all_lowercase"}]

# (case, file name, content, row or None, words the message must contain)
FILE_ERRORS = [
    ("missing file", "absent.jsonl", None, None, ["file not found"]),
    ("unsupported suffix", "prompts.txt", "hello", None, ["unsupported file type '.txt'", ".jsonl, .csv, .parquet"]),
    ("empty jsonl", "p.jsonl", "", None, ["file is empty"]),
    ("blank jsonl", "p.jsonl", "\n  \n", None, ["no rows"]),
    ("not utf-8", "p.jsonl", b'{"id": "a", "prompt": "caf\xe9"}\n', None, ["not valid UTF-8"]),
    ("invalid json", "p.jsonl", _line(**GOOD) + "\n{oops\n", 2, ["invalid JSON"]),
    ("not an object", "p.jsonl", "[1, 2]\n", 1, ["expected a JSON object, got list"]),
    ("missing key", "p.jsonl", _line(id="a", prompt="Hi."), 1, ["missing key(s): constraints"]),
    ("unknown key", "p.jsonl", _line(**GOOD, notes="x"), 1, ["unknown key(s): notes"]),
    ("duplicate id", "p.jsonl", "\n".join([_line(**GOOD), _line(**GOOD)]), 2, ["duplicate id 'a'", "first at row 1"]),
    ("empty id", "p.jsonl", _line(**{**GOOD, "id": " "}), 1, ["id must be a non-empty string"]),
    ("numeric id", "p.jsonl", _line(**{**GOOD, "id": 7}), 1, ["id must be a non-empty string, got 7"]),
    ("empty prompt", "p.jsonl", _line(**{**GOOD, "prompt": "  "}), 1, ["prompt is empty"]),
    ("long prompt", "p.jsonl", _line(**{**GOOD, "prompt": "x" * (MAX_PROMPT_CHARS + 1)}), 1,
     [f"at most {MAX_PROMPT_CHARS}"]),
    ("no constraints", "p.jsonl", _line(**{**GOOD, "constraints": []}), 1, ["at least one constraint"]),
    ("unknown constraint", "p.jsonl", _line(**{**GOOD, "constraints": [{"type": "shout"}]}), 1,
     ["invalid constraint 1", "unknown constraint type 'shout'", "all_lowercase"]),
    ("bad constraint args", "p.jsonl",
     _line(**{**GOOD, "constraints": [*LOWER, {"type": "word_count_max", "args": {"max_words": "many"}}]}), 1,
     ["invalid constraint 2", "word_count_max", "max_words"]),
    ("bad topic", "p.jsonl", _line(**GOOD, topic=3), 1, ["topic must be a string"]),
    ("empty csv", "p.csv", "", None, ["file is empty"]),
    ("header-only csv", "p.csv", "id,prompt,constraints\n", None, ["no rows"]),
    ("csv missing column", "p.csv", "id,prompt\na,Hi.\n", None, ["missing column(s): constraints"]),
    ("csv unknown column", "p.csv", "id,prompt,constraints,Unnamed: 0\n", None, ["unknown column(s): Unnamed: 0"]),
    ("csv extra value", "p.csv", 'id,prompt,constraints\na,Hi.,"[]",extra\n', 1, ["more values than columns"]),
    ("csv constraints not json", "p.csv", "id,prompt,constraints\na,Hi.,[{oops\nb,Yo.,[]\n", 1,
     ["constraints is not valid JSON"]),
    ("csv empty prompt in row 2", "p.csv",
     'id,prompt,constraints\na,Hi.,"[{""type"": ""title""}]"\nb,,"[{""type"": ""title""}]"\n', 2,
     ["prompt is empty"]),
    ("csv not utf-8", "p.csv", b"id,prompt,constraints\na,caf\xe9,[]\n", None, ["not valid UTF-8"]),
    ("garbage parquet", "p.parquet", b"this is not parquet", None, ["not a readable Parquet file"]),
]


@pytest.mark.parametrize(("case", "name", "content", "row", "expected"), FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_load_errors_name_file_and_row(tmp_path, case, name, content, row, expected):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError) as error:
        load_prompts(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    if row is None:
        assert "row " not in message.split(": ")[1]
    else:
        assert f"{path}: row {row}: " in message
    for word in expected:
        assert word in message


def test_parquet_errors_name_column_and_row(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"id": ["a"], "prompt": ["Hi."]}).to_parquet(path)
    with pytest.raises(PromptFileError, match=r"p\.parquet: missing column\(s\): constraints"):
        load_prompts(path)
    pd.DataFrame({"id": ["a", "b"], "prompt": ["Hi.", "Yo."], "constraints": ['[{"type": "title"}]', "[]"]}
                 ).to_parquet(path)
    with pytest.raises(PromptFileError, match=r"p\.parquet: row 2: .*at least one constraint"):
        load_prompts(path)
    pd.DataFrame({"id": [], "prompt": [], "constraints": []}, dtype=str).to_parquet(path)
    with pytest.raises(PromptFileError, match=r"p\.parquet: no rows"):
        load_prompts(path)


def test_prompt_file_error_is_a_value_error():
    assert issubclass(PromptFileError, ValueError)


# --------------------------------------------------------------------------------------------------------------
# Splits and rounds


def test_split_has_no_overlap_and_covers_everything(defaults):
    train, held_out = split_prompts(defaults, 0.25)
    assert len(train) + len(held_out) == len(defaults)
    assert not {p.id for p in train} & {p.id for p in held_out}
    assert not {normalize_prompt_text(p.prompt) for p in train} & {normalize_prompt_text(p.prompt) for p in held_out}
    assert 40 <= len(held_out) <= 90  # roughly the requested quarter
    assert [p for p in defaults if p in held_out] == held_out  # input order kept


def test_split_keeps_same_text_together():
    prompts = []
    for i in range(60):
        prompts.append(make_prompt(f"p{i}", f"Describe thing number {i}."))
        prompts.append(make_prompt(f"q{i}", f"  DESCRIBE thing\nnumber {i}.  "))
    train, held_out = split_prompts(prompts, 0.3, seed=1)
    train_texts = {normalize_prompt_text(p.prompt) for p in train}
    assert not train_texts & {normalize_prompt_text(p.prompt) for p in held_out}
    assert len(train) % 2 == 0 and len(held_out) % 2 == 0 and held_out


def test_split_is_deterministic_and_stable_when_prompts_are_appended(defaults):
    train, held_out = split_prompts(defaults[:100], 0.25, seed=7)
    assert (train, held_out) == split_prompts(defaults[:100], 0.25, seed=7)
    bigger_train, bigger_eval = split_prompts(defaults, 0.25, seed=7)
    assert [p for p in bigger_train if p in defaults[:100]] == train
    assert [p for p in bigger_eval if p in defaults[:100]] == held_out
    assert split_prompts(defaults, 0.25, seed=8)[1] != bigger_eval


def test_split_stable_when_a_duplicate_text_is_appended():
    prompts = [make_prompt(f"p{i}", f"Describe thing number {i}.") for i in range(40)]
    train, held_out = split_prompts(prompts, 0.5)
    # A new id with an existing text (and an id sorting first) joins its twin instead of moving it.
    twin = make_prompt("a-first", prompts[0].prompt.upper())
    new_train, new_eval = split_prompts([*prompts, twin], 0.5)
    assert [p for p in new_train if p != twin] == train and [p for p in new_eval if p != twin] == held_out
    assert (twin in new_eval) == (prompts[0] in held_out)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fraction(defaults, fraction):
    with pytest.raises(ValueError, match="eval_fraction must be strictly between 0 and 1"):
        split_prompts(defaults, fraction)


def test_split_needs_both_sides():
    with pytest.raises(ValueError, match="1 prompts .* both sides need at least one"):
        split_prompts([make_prompt("only")], 0.5)


def test_split_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="duplicate prompt id 'a'"):
        split_prompts([make_prompt("a"), make_prompt("a", "Other.")], 0.5)


def test_round_windows_rotate_through_all_prompts(defaults):
    train = defaults[:30]
    rounds = [sample_round_prompts(train, 10, round_index) for round_index in (1, 2, 3, 4)]
    assert all(len(r) == 10 for r in rounds)
    ids = [{p.id for p in r} for r in rounds]
    assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]
    assert ids[0] | ids[1] | ids[2] == {p.id for p in train}
    assert rounds[3] == rounds[0]  # wraps after a full pass


def test_round_windows_wrap_when_k_does_not_divide(defaults):
    train = defaults[:7]
    first, second = sample_round_prompts(train, 5, 1), sample_round_prompts(train, 5, 2)
    assert len({p.id for p in first + second}) == 7  # the second window wraps around to the start


def test_round_sampling_is_deterministic_and_order_independent(defaults):
    train = defaults[:50]
    assert sample_round_prompts(train, 8, 2, seed=3) == sample_round_prompts(list(reversed(train)), 8, 2, seed=3)
    assert sample_round_prompts(train, 8, 2, seed=3) != sample_round_prompts(train, 8, 2, seed=4)


def test_round_sampling_returns_all_when_k_is_large(defaults):
    train = defaults[:5]
    assert sorted(p.id for p in sample_round_prompts(train, 64, 3)) == sorted(p.id for p in train)


@pytest.mark.parametrize(("k", "round_index", "message"), [(0, 1, "k must be >= 1"), (3, 0, "1-based")])
def test_round_sampling_rejects_bad_arguments(defaults, k, round_index, message):
    with pytest.raises(ValueError, match=message):
        sample_round_prompts(defaults[:10], k, round_index)
    with pytest.raises(ValueError, match="no training prompts"):
        sample_round_prompts([], 3, 1)
