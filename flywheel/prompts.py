"""Prompt sets: synthesized (everyday tasks x verifiable constraints) or loaded from a user's file, and split into
a stable held-out evaluation set and per-round training windows.

Everything here is deterministic for a given seed and derives ids and splits from content hashes, so reruns and
appended prompt files never reshuffle what was already trained on or held out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flywheel.verifiers import VERIFIERS, Constraint, compatible

DEFAULT_PROMPT_COUNT = 256
# The longest prompt a file may hold: about 5,000 tokens, far beyond what a round trains on (training.max_length) but
# small enough that a runaway cell (a pasted document, a 1 MB blob) is refused by name instead of stalling generation.
MAX_PROMPT_CHARS = 20_000
SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".parquet")
REQUIRED_COLUMNS = ("id", "prompt", "constraints")
OPTIONAL_COLUMNS = ("topic",)

# Everyday tasks a small model can answer in about a hundred tokens. Free of digits and commas so that no
# sampled constraint (no_digits, no_commas, bullet counts) contradicts the task itself.
TASKS: tuple[str, ...] = (
    "Write a short note to a neighbour about a lost cat.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Describe a morning routine.",
    "Give tips for staying focused while studying.",
    "Write a thank-you message to a teacher.",
    "Explain why the sky is blue.",
    "Describe your favourite season.",
    "Suggest a simple recipe for a quick breakfast.",
    "Write a short poem about the ocean.",
    "Explain how to make a cup of tea.",
    "Give advice to someone starting a new job.",
    "Describe a walk through a busy market.",
    "Write a product description for a reusable water bottle.",
    "Explain what a rainbow is.",
    "Write an invitation to a birthday picnic.",
    "Describe how to plant a tomato seedling.",
    "Explain why sleep is important.",
    "Write a short story about a lost umbrella.",
    "Give reasons to visit a public library.",
    "Describe the view from a mountain top.",
    "Write a reminder to water the office plants.",
    "Explain how a bicycle works.",
    "Suggest ways to save water at home.",
    "Write a short review of a cozy café.",
    "Explain what clouds are made of.",
    "Describe a rainy afternoon at home.",
    "Write an apology for missing a meeting.",
    "Give tips for packing a suitcase.",
    "Explain how bees make honey.",
    "Describe a friendly dog.",
    "Write a welcome message for new club members.",
    "Explain why we have seasons.",
    "Suggest a name for a small bakery and explain your choice.",
    "Write a postcard from a seaside town.",
    "Explain how to tie a shoelace.",
    "Describe the smell of fresh bread.",
    "Give advice for a first camping trip.",
    "Write a short speech for a school sports day.",
    "Explain what recycling is.",
    "Describe a favourite childhood game.",
    "Write a note asking a friend to lend you a book.",
    "Explain how the moon seems to change shape.",
    "Suggest some healthy snacks for school.",
    "Describe a quiet evening by a lake.",
    "Write a short bio for a volunteer gardener.",
    "Explain how to cross a road safely.",
    "Describe what a city looks like at night.",
    "Write a message congratulating a friend on a new baby.",
    "Explain why plants need sunlight.",
    "Give tips for a good night's sleep.",
    "Describe a snowy morning.",
    "Write a short letter to your future self.",
    "Explain how a compass works.",
    "Suggest fun activities for a rainy day.",
    "Write a notice about a community clean-up event.",
    "Describe a visit to a farm.",
    "Explain what a volcano is.",
    "Give advice on how to make new friends.",
    "Write a short fable about a clever fox.",
    "Explain how to care for a houseplant.",
    "Describe the sound of a thunderstorm.",
    "Write a message to thank a bus driver.",
    "Explain why exercise is good for you.",
    "Describe your ideal weekend.",
    "Write a short weather report for a sunny day.",
    "Explain how to boil an egg.",
    "Describe an old lighthouse.",
    "Give tips for keeping a tidy desk.",
    "Write a note to a roommate about doing the dishes.",
    "Explain what friendship means.",
    "Describe a hot air balloon ride.",
    "Explain how to read a map.",
)

# Sampling weights: types a small model satisfies whenever it follows the instruction are drawn more often than
# hard ones (JSON, sections, two responses, other languages), so rewards are informative from round one.
# Types not listed get weight 1.0.
TYPE_WEIGHTS: dict[str, float] = {
    **dict.fromkeys(
        ("all_lowercase", "all_uppercase", "no_commas", "end_with_phrase", "start_with_phrase", "word_count_min",
         "word_count_max", "bullet_count_exact", "title", "postscript", "quotation_wrapped"),
        3.0,
    ),
    **dict.fromkeys(
        ("keywords_include", "forbidden_words", "first_word", "last_word", "ends_with_question", "no_digits",
         "sentence_count", "highlighted_sections", "placeholders", "numbered_list_count", "paragraph_count"),
        1.5,
    ),
    **dict.fromkeys(
        ("json_format", "section_count", "two_responses", "response_language", "repeat_request",
         "nth_paragraph_first_word"),
        0.5,
    ),
}


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the single-line message names the file and, where known, the row."""


class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    constraints: list[Constraint] = Field(min_length=1)
    topic: str = ""

    @field_validator("id", "prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def _prompt_id(text: str) -> str:
    return "syn-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _pick_types(rng: random.Random, count: int) -> list[str]:
    chosen: list[str] = []
    for _ in range(count):
        candidates = [name for name in VERIFIERS if compatible([*chosen, name])]
        if not candidates:
            break
        weights = [TYPE_WEIGHTS.get(name, 1.0) for name in candidates]
        chosen.append(rng.choices(candidates, weights=weights)[0])
    return chosen


def synthesize_prompts(n: int, seed: int = 0, max_constraints: int = 3) -> list[Prompt]:
    """``n`` distinct prompts, each a task plus 1..``max_constraints`` compatible constraints.

    Prompts are drawn one after another from one seeded generator, so a smaller ``n`` yields a prefix of a larger.
    """
    if n < 0:
        raise ValueError(f"synthesize_prompts: n must be >= 0, got {n}")
    if max_constraints < 1:
        raise ValueError(f"synthesize_prompts: max_constraints must be >= 1, got {max_constraints}")
    rng = random.Random(seed)
    prompts: list[Prompt] = []
    seen_texts: set[str] = set()
    attempts_left = 50 * n + 1000  # duplicates are rare; this only stops an impossible request
    while len(prompts) < n and attempts_left > 0:
        attempts_left -= 1
        task = rng.choice(TASKS)
        constraints = []
        for name in _pick_types(rng, rng.randint(1, max_constraints)):
            args = VERIFIERS[name].sample_args(rng)
            if name == "repeat_request":
                # The sampler cannot know the task; the request to repeat is the task sentence itself.
                args = {**args, "prompt_to_repeat": task}
            constraints.append(Constraint(type=name, args=args))
        text = " ".join([task, *(constraint.describe() for constraint in constraints)])
        if text in seen_texts:
            continue
        seen_texts.add(text)
        prompts.append(Prompt(id=_prompt_id(text), prompt=text, constraints=constraints, topic=task))
    if len(prompts) < n:
        raise ValueError(f"synthesize_prompts: could only make {len(prompts)} distinct prompts of {n} requested")
    return prompts


def default_prompts(seed: int = 0, count: int = DEFAULT_PROMPT_COUNT) -> list[Prompt]:
    return synthesize_prompts(count, seed)


def recipe_prompts(prompts_config, root: Path) -> list[Prompt]:
    """A recipe's whole prompt pool (``PromptsConfig``): synthesized when its source is builtin, else its file
    (relative to ``root``)."""
    from flywheel.config import resolve

    if prompts_config.source == "builtin":
        return default_prompts(seed=prompts_config.seed, count=prompts_config.builtin_count)
    return load_prompts(resolve(prompts_config.source, root))


# --------------------------------------------------------------------------------------------------------------
# Files


def _error(path: Path, message: str, row: int | None = None) -> PromptFileError:
    where = f"{path}: row {row}" if row is not None else f"{path}"
    return PromptFileError(f"{where}: {message}")


def _validation_summary(error: ValidationError) -> str:
    # pydantic's own text spans several lines; keep only what was wrong, on one line.
    parts = []
    for detail in error.errors():
        message = detail["msg"].removeprefix("Value error, ")
        location = ".".join(str(part) for part in detail["loc"])
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # tolerate the BOM spreadsheet programs write
    except UnicodeDecodeError as error:
        raise _error(path, f"not valid UTF-8 (bad byte at offset {error.start}); save the file as UTF-8") from None


def _check_columns(path: Path, columns: Sequence[str], row: int | None = None) -> None:
    noun = "key" if row is not None else "column"
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise _error(path, f"missing {noun}(s): {', '.join(missing)}", row)
    allowed = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
    unknown = [str(name) for name in columns if name not in allowed]
    if unknown:
        raise _error(path, f"unknown {noun}(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}", row)


def _read_jsonl(path: Path, data: bytes) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    # Split on "\n" only: str.splitlines would also break at U+2028 inside JSON strings written unescaped.
    for line_number, line in enumerate(_decode(path, data).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _error(path, f"invalid JSON: {error.msg} at column {error.colno}", line_number) from None
        if not isinstance(record, dict):
            raise _error(path, f"expected a JSON object, got {type(record).__name__}", line_number)
        _check_columns(path, list(record), line_number)
        rows.append((line_number, record))
    return rows


def _read_csv(path: Path, data: bytes) -> list[tuple[int, dict[str, Any]]]:
    text = _decode(path, data)
    if not text.strip():
        raise _error(path, "file is empty")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        _check_columns(path, reader.fieldnames or [])
        for row_number, record in enumerate(reader, start=1):
            if None in record:
                raise _error(path, "more values than columns", row_number)
            rows.append((row_number, dict(record)))
    except csv.Error as error:
        raise _error(path, f"unreadable CSV near line {reader.line_num}: {error}") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    import pyarrow as pa  # lazily: only Parquet users pay for the import
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _error(path, f"not a readable Parquet file: {first_line}") from None
    _check_columns(path, table.column_names)
    return list(enumerate(table.to_pylist(), start=1))


def _parse_constraints(path: Path, row: int, raw: Any) -> list[Constraint]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise _error(path, f"constraints is not valid JSON: {error.msg} at column {error.colno}", row) from None
    if not isinstance(raw, list) or not raw:
        raise _error(path, "constraints must be a non-empty list of {type, args} objects "
                           "(at least one constraint is required)", row)
    constraints = []
    for index, item in enumerate(raw, start=1):
        try:
            constraints.append(Constraint.model_validate(item))
        except ValidationError as error:
            raise _error(path, f"invalid constraint {index}: {_validation_summary(error)}", row) from None
    return constraints


def _parse_row(path: Path, row: int, record: dict[str, Any]) -> Prompt:
    prompt_id = record.get("id")
    if not isinstance(prompt_id, str) or not prompt_id.strip():
        raise _error(path, f"id must be a non-empty string, got {prompt_id!r}", row)
    text = record.get("prompt")
    if not isinstance(text, str):
        raise _error(path, f"prompt must be a string, got {type(text).__name__}", row)
    if not text.strip():
        raise _error(path, "prompt is empty", row)
    if len(text) > MAX_PROMPT_CHARS:
        raise _error(path, f"prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed", row)
    topic = record.get("topic")
    topic = "" if topic is None else topic
    if not isinstance(topic, str):
        raise _error(path, f"topic must be a string, got {type(topic).__name__}", row)
    constraints = _parse_constraints(path, row, record.get("constraints"))
    try:
        return Prompt(id=prompt_id, prompt=text, constraints=constraints, topic=topic)
    except ValidationError as error:
        raise _error(path, _validation_summary(error), row) from None


def load_prompts(path: Path) -> list[Prompt]:
    """Prompts from a ``.jsonl``, ``.csv`` or ``.parquet`` file.

    Rows are 1-based: JSONL rows are line numbers, CSV and Parquet rows count data rows (the header excluded).
    Every problem raises ``PromptFileError`` naming the file, the row where there is one, and what is wrong.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise _error(path, f"unsupported file type {path.suffix or '(none)'!r}; supported: "
                           f"{', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise _error(path, "file not found")
    if path.stat().st_size == 0:
        raise _error(path, "file is empty")
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        data = path.read_bytes()
        rows = _read_jsonl(path, data) if suffix == ".jsonl" else _read_csv(path, data)
    if not rows:
        raise _error(path, "no rows")
    prompts: list[Prompt] = []
    first_row_of: dict[str, int] = {}
    for row, record in rows:
        prompt = _parse_row(path, row, record)
        if prompt.id in first_row_of:
            raise _error(path, f"duplicate id {prompt.id!r} (first at row {first_row_of[prompt.id]})", row)
        first_row_of[prompt.id] = row
        prompts.append(prompt)
    return prompts


def save_prompts(prompts: Sequence[Prompt], path: Path) -> None:
    """Write prompts as JSONL (UTF-8), the format ``load_prompts`` reads back unchanged."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"save_prompts: {path}: prompts are saved as JSONL; use a .jsonl suffix")
    if not prompts:
        raise ValueError(f"save_prompts: {path}: no prompts to save (an empty file cannot be loaded back)")
    _ensure_unique_ids(prompts, f"save_prompts: {path}")
    lines = [json.dumps(prompt.model_dump(mode="json"), ensure_ascii=False) for prompt in prompts]
    from flywheel.models import atomic_write_text  # a failed write (a full disk) leaves no half file behind

    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Splits and rounds


def _ensure_unique_ids(prompts: Sequence[Prompt], context: str) -> None:
    seen: set[str] = set()
    for prompt in prompts:
        if prompt.id in seen:
            raise ValueError(f"{context}: duplicate prompt id {prompt.id!r}")
        seen.add(prompt.id)


def unit_hash(purpose: str, seed: int, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for (purpose, seed, key), independent of input order."""
    digest = hashlib.sha256(f"{purpose}\x00{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def normalize_prompt_text(text: str) -> str:
    return " ".join(text.lower().split())


def split_prompts(prompts: Sequence[Prompt], eval_fraction: float, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval): a held-out split decided per prompt by a hash of (seed, id), so it is stable when prompts
    are appended. Prompts whose normalized text is the same go where the first of them (in input order) goes, so
    neither an id nor a text is on both sides."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"split_prompts: eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")
    _ensure_unique_ids(prompts, "split_prompts")
    anchor_of_text: dict[str, str] = {}
    train: list[Prompt] = []
    held_out: list[Prompt] = []
    for prompt in prompts:
        anchor = anchor_of_text.setdefault(normalize_prompt_text(prompt.prompt), prompt.id)
        (held_out if unit_hash("split", seed, anchor) < eval_fraction else train).append(prompt)
    if not train or not held_out:
        raise ValueError(
            f"split_prompts: {len(prompts)} prompts with eval_fraction={eval_fraction} gave {len(train)} train and "
            f"{len(held_out)} eval prompts; both sides need at least one (add prompts or change eval_fraction)"
        )
    return train, held_out


def sample_round_prompts(train: Sequence[Prompt], k: int, round_index: int, seed: int = 0) -> list[Prompt]:
    """The ``k`` training prompts for round ``round_index`` (1-based): consecutive windows of one seeded order,
    wrapping around, so successive rounds see different prompts until all have been seen."""
    if k < 1:
        raise ValueError(f"sample_round_prompts: k must be >= 1, got {k}")
    if round_index < 1:
        raise ValueError(f"sample_round_prompts: round_index is 1-based, got {round_index}")
    if not train:
        raise ValueError("sample_round_prompts: no training prompts to sample from")
    # Ordering by hash (not shuffling the given list) makes the windows independent of the input order.
    order = sorted(train, key=lambda prompt: (unit_hash("round", seed, prompt.id), prompt.id))
    if k >= len(order):
        return order
    start = ((round_index - 1) * k) % len(order)
    return [order[(start + offset) % len(order)] for offset in range(k)]
