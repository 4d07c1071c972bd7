"""Verifiable instruction checks (IFEval-style): the flywheel's programmatic judge.

Each instruction type is a ``VerifierSpec`` in ``VERIFIERS``: a pure check, the sentence that asks for it in a
prompt, a sampler of small arguments for synthesized prompts, a pydantic model of its arguments, and the types it
cannot be combined with. Every check has one signature, ``check(response, *, strict=True, **args) -> bool``.

Two rules hold for every check, so no verifier can be gamed by an empty answer or needs its own loose mode:

* a blank (empty or whitespace-only) response fails, since it follows no instruction;
* loose mode (as in IFEval) also accepts the response after stripping markdown ``*``, dropping its first line,
  dropping its last line, or any combination of these; it is implemented once, in ``_with_loose_mode``.

Text heuristics are deliberately simple and documented where they are used: sentences end at ``.``, ``!``, ``?``
or a line break (abbreviations such as "e.g." over-count); paragraphs are separated by blank lines or a ``***``
line; ``response_language`` only tells scripts apart (see ``_LANGUAGES``).
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

Relation = Literal["at least", "at most"]
NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# One word as ``_WORDS`` tokenizes it, so first/last-word checks compare like with like.
SingleWord = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[^\W_]+(?:['’-][^\W_]+)*$")]
Count = Annotated[int, Field(ge=1, le=1000)]

_WORDS = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


class VerifierArgs(BaseModel):
    """Base of every verifier's argument model: unknown arguments are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(VerifierArgs):
    pass


@dataclass(frozen=True)
class VerifierSpec:
    name: str
    check: Callable[..., bool]
    describe: Callable[[dict[str, Any]], str]
    sample_args: Callable[[random.Random], dict[str, Any]]
    args_model: type[VerifierArgs]
    conflicts: frozenset[str]


# --------------------------------------------------------------------------------------------------------------
# Shared text helpers


def _words(text: str) -> list[str]:
    return _WORDS.findall(text)


def _compare(count: int, relation: str, target: int) -> bool:
    return count >= target if relation == "at least" else count <= target


def _sentences(text: str) -> list[str]:
    # Heuristic: a sentence ends at ., ! or ? followed by whitespace, or at a line break (list items count).
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [part for part in parts if _WORDS.search(part)]


def _paragraphs(text: str) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.strip() in ("", "***"):
            if current:
                paragraphs.append("\n".join(current))
                current = []
        else:
            current.append(line)
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _whole_word(term: str) -> re.Pattern[str]:
    # Lookarounds instead of \b so terms that start or end with punctuation still match as whole words.
    return re.compile(rf"(?<![^\W_]){re.escape(term.strip())}(?![^\W_])", re.IGNORECASE)


def _quoted(items: Sequence[str]) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ordinal(n: int) -> str:
    names = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}
    return names.get(n, f"{n}th")


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------------------
# Loose mode, once for every verifier


def loose_variants(response: str) -> list[str]:
    """The response and its IFEval loose variants: markdown ``*`` stripped, first/last line dropped, combined."""
    variants: list[str] = []
    for text in (response, response.replace("*", "")):
        lines = text.split("\n")
        for start, stop in ((0, len(lines)), (1, len(lines)), (0, len(lines) - 1), (1, len(lines) - 1)):
            variant = text if (start, stop) == (0, len(lines)) else "\n".join(lines[start:stop]).strip()
            if variant not in variants:
                variants.append(variant)
    return variants


def _with_loose_mode(strict_check: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(strict_check)
    def check(response: str, *, strict: bool = True, **args: Any) -> bool:
        candidates = [response] if strict else loose_variants(response)
        return any(text.strip() != "" and strict_check(text, **args) for text in candidates)

    return check


# --------------------------------------------------------------------------------------------------------------
# Argument models and sampling pools. Pools are disjoint from the forbidden words and free of commas and digits,
# so sampled arguments never contradict each other in one prompt; numbers stay small because the policy is a
# small model answering in about a hundred tokens.

_KEYWORDS = ("morning", "simple", "friendly", "bright", "quiet", "together", "careful", "water", "garden", "light")
_FORBIDDEN = ("very", "really", "basically", "actually", "just", "thing", "stuff", "nice", "okay", "literally")
_START_PHRASES = ("Hello there", "Here is my answer", "Good question", "Dear friend", "In short", "Of course")
_END_PHRASES = ("Is there anything else I can help with?", "Thank you for reading.", "That is all.",
                "Have a great day!", "Hope this helps.")
_FIRST_WORDS = ("Today", "First", "Yes", "Imagine", "Well", "Remember")
_LAST_WORDS = ("today", "together", "soon", "forever", "again", "friends")
_LETTERS = "eaotsnrh"
_SECTION_WORDS = ("SECTION", "PART")
_GENERIC_REQUESTS = ("Describe a sunny day.", "Explain why people enjoy music.", "Write a short note to a friend.")


class KeywordsArgs(VerifierArgs):
    keywords: list[NonEmptyText] = Field(min_length=1)


class KeywordFrequencyArgs(VerifierArgs):
    keyword: NonEmptyText
    relation: Relation
    frequency: Count


class ForbiddenWordsArgs(VerifierArgs):
    forbidden_words: list[NonEmptyText] = Field(min_length=1)


class LetterFrequencyArgs(VerifierArgs):
    letter: Annotated[str, StringConstraints(pattern=r"^[^\W\d_]$")]
    relation: Relation
    frequency: Count


class MinWordsArgs(VerifierArgs):
    min_words: Count


class MaxWordsArgs(VerifierArgs):
    max_words: Count


class SentenceCountArgs(VerifierArgs):
    relation: Relation
    num_sentences: Count


class ParagraphCountArgs(VerifierArgs):
    num_paragraphs: Count


class BulletCountArgs(VerifierArgs):
    num_bullets: Count


class NumberedListArgs(VerifierArgs):
    num_items: Count


class SectionCountArgs(VerifierArgs):
    section_word: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]+$")]
    num_sections: Count


class HighlightArgs(VerifierArgs):
    num_highlights: Count


class CapitalWordArgs(VerifierArgs):
    relation: Relation
    frequency: Annotated[int, Field(ge=0, le=1000)]


class PhraseArgs(VerifierArgs):
    phrase: NonEmptyText


class PlaceholderArgs(VerifierArgs):
    num_placeholders: Count


class PostscriptArgs(VerifierArgs):
    marker: Literal["P.S.", "P.P.S."]


class RepeatRequestArgs(VerifierArgs):
    prompt_to_repeat: NonEmptyText


class WordArgs(VerifierArgs):
    word: SingleWord


class NthParagraphArgs(VerifierArgs):
    num_paragraphs: Annotated[int, Field(ge=1, le=100)]
    nth_paragraph: Annotated[int, Field(ge=1, le=100)]
    first_word: SingleWord

    @model_validator(mode="after")
    def _nth_within_count(self) -> NthParagraphArgs:
        if self.nth_paragraph > self.num_paragraphs:
            raise ValueError(
                f"nth_paragraph ({self.nth_paragraph}) must not exceed num_paragraphs ({self.num_paragraphs})"
            )
        return self


# Script heuristic for response_language: "en" means at least 90% of the letters are ASCII; any other language
# means at least half of the letters are in its script. It cannot tell apart languages sharing a script
# (English vs French, Russian vs Ukrainian); Japanese needs some kana, Chinese must have none.
_LANGUAGES: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {
    "en": ("English", ((0x41, 0x5A), (0x61, 0x7A))),
    "ru": ("Russian", ((0x0400, 0x04FF),)),
    "el": ("Greek", ((0x0370, 0x03FF),)),
    "ar": ("Arabic", ((0x0600, 0x06FF),)),
    "he": ("Hebrew", ((0x0590, 0x05FF),)),
    "hi": ("Hindi", ((0x0900, 0x097F),)),
    "th": ("Thai", ((0x0E00, 0x0E7F),)),
    "ko": ("Korean", ((0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F))),
    "zh": ("Chinese", ((0x4E00, 0x9FFF),)),
    "ja": ("Japanese", ((0x3040, 0x30FF), (0x4E00, 0x9FFF))),
}
_KANA = ((0x3040, 0x30FF),)


class LanguageArgs(VerifierArgs):
    language: Literal["en", "ru", "el", "ar", "he", "hi", "th", "ko", "zh", "ja"]


def _in_ranges(char: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(low <= ord(char) <= high for low, high in ranges)


# --------------------------------------------------------------------------------------------------------------
# Strict checks: (response, **args) -> bool. Loose mode and the blank-response rule are added by _with_loose_mode.


def _keywords_include(response: str, *, keywords: list[str]) -> bool:
    return all(_whole_word(keyword).search(response) for keyword in keywords)


def _keyword_frequency(response: str, *, keyword: str, relation: str, frequency: int) -> bool:
    return _compare(len(_whole_word(keyword).findall(response)), relation, frequency)


def _forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    return not any(_whole_word(word).search(response) for word in forbidden_words)


def _letter_frequency(response: str, *, letter: str, relation: str, frequency: int) -> bool:
    return _compare(response.lower().count(letter.lower()), relation, frequency)


def _word_count_min(response: str, *, min_words: int) -> bool:
    return len(_words(response)) >= min_words


def _word_count_max(response: str, *, max_words: int) -> bool:
    return len(_words(response)) <= max_words


def _sentence_count(response: str, *, relation: str, num_sentences: int) -> bool:
    return _compare(len(_sentences(response)), relation, num_sentences)


def _paragraph_count(response: str, *, num_paragraphs: int) -> bool:
    return len(_paragraphs(response)) == num_paragraphs


# What opens a list item's line: a bullet (* - •) or a number (1. or 1)), then a space. The repairs use the same.
BULLET_MARK = r"[ \t]*[*\-•][ \t]+"
NUMBER_MARK = r"[ \t]*\d+[.)][ \t]+"


def section_mark(*words: str) -> str:
    """What opens a section's line: one of the section words and its number, optionally behind markdown such as
    "## " or "**"; the word's case matters. The repairs use the same."""
    return rf"[\W_]*(?:{'|'.join(re.escape(word) for word in words)})\s+\d+"


def _bullet_count_exact(response: str, *, num_bullets: int) -> bool:
    return len(re.findall(rf"(?m)^{BULLET_MARK}\S", response)) == num_bullets


def _numbered_list_count(response: str, *, num_items: int) -> bool:
    return len(re.findall(rf"(?m)^{NUMBER_MARK}\S", response)) == num_items


def _section_count(response: str, *, section_word: str, num_sections: int) -> bool:
    markers = re.findall(rf"(?m)^{section_mark(section_word)}", response)
    return len(markers) == num_sections


def _title(response: str) -> bool:
    return any(title.strip() for title in re.findall(r"<<([^\n<>]*)>>", response))


def highlight_count(response: str) -> int:
    """Non-empty markdown highlights (**bold** or *italic*) in a response."""
    bold = re.findall(r"\*\*([^\n*]+)\*\*", response)
    italic = re.findall(r"(?<!\*)\*([^\n*]+)\*(?!\*)", response)
    return sum(1 for text in bold + italic if text.strip())


def _highlighted_sections(response: str, *, num_highlights: int) -> bool:
    return highlight_count(response) >= num_highlights


def _json_format(response: str) -> bool:
    # Only an object or array counts: a bare number or string is valid JSON but not "a JSON answer".
    try:
        value = json.loads(response.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, (dict, list))


def _all_lowercase(response: str) -> bool:
    return response == response.lower() and any(char.islower() for char in response)


def _all_uppercase(response: str) -> bool:
    return response == response.upper() and any(char.isupper() for char in response)


def capital_word_count(response: str) -> int:
    """Words in capitals; single letters ("I", "A") are not counted: grammar capitalizes them, not emphasis."""
    return len([word for word in _words(response) if len(word) >= 2 and word.isupper()])


def _capital_word_frequency(response: str, *, relation: str, frequency: int) -> bool:
    return _compare(capital_word_count(response), relation, frequency)


def _no_commas(response: str) -> bool:
    return "," not in response and "，" not in response


def _no_digits(response: str) -> bool:
    return not any(char.isdigit() for char in response)


def _start_with_phrase(response: str, *, phrase: str) -> bool:
    return response.lstrip().lower().startswith(phrase.strip().lower())


def _end_with_phrase(response: str, *, phrase: str) -> bool:
    return response.rstrip().lower().endswith(phrase.strip().lower())


def _ends_with_question(response: str) -> bool:
    return response.rstrip().endswith(("?", "？"))


def _quotation_wrapped(response: str) -> bool:
    text = response.strip()
    return len(text) >= 2 and (text[0], text[-1]) in (('"', '"'), ("“", "”"))


def placeholder_count(response: str) -> int:
    """Non-empty square-bracket placeholders ([name]) in a response."""
    return len([text for text in re.findall(r"\[([^\[\]\n]*)\]", response) if text.strip()])


def _placeholders(response: str, *, num_placeholders: int) -> bool:
    return placeholder_count(response) >= num_placeholders


def _postscript(response: str, *, marker: str) -> bool:
    # A line that starts (after optional markdown) with the marker, spaces between its letters allowed.
    pattern = r"p\.\s?s\." if marker == "P.S." else r"p\.\s?p\.\s?s\."
    return re.search(rf"(?im)^[\W_]*{pattern}", response) is not None


def _response_language(response: str, *, language: str) -> bool:
    letters = [char for char in response if char.isalpha()]
    if not letters:
        return False
    ranges = _LANGUAGES[language][1]
    share = sum(1 for char in letters if _in_ranges(char, ranges)) / len(letters)
    if language == "en":
        return share >= 0.9
    has_kana = any(_in_ranges(char, _KANA) for char in letters)
    if language == "ja" and not has_kana:
        return False
    if language == "zh" and has_kana:
        return False
    return share >= 0.5


def _repeat_request(response: str, *, prompt_to_repeat: str) -> bool:
    # Whitespace differences (a line break for a space) do not count as changing the request.
    text, request = _collapse_whitespace(response).lower(), _collapse_whitespace(prompt_to_repeat).lower()
    return text.startswith(request) and _WORDS.search(text[len(request):]) is not None


def _two_responses(response: str) -> bool:
    parts = [part.strip() for part in re.split(r"\*{6,}", response)]
    # A separator at the very start or end leaves an empty part; that is tolerated, an empty middle is not.
    if parts and not parts[0]:
        parts = parts[1:]
    if parts and not parts[-1]:
        parts = parts[:-1]
    return len(parts) == 2 and all(_WORDS.search(part) for part in parts) and parts[0] != parts[1]


def _first_word(response: str, *, word: str) -> bool:
    words = _words(response)
    return bool(words) and words[0].lower() == word.lower()


def _last_word(response: str, *, word: str) -> bool:
    words = _words(response)
    return bool(words) and words[-1].lower() == word.lower()


def _nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = _paragraphs(response)
    if len(paragraphs) != num_paragraphs:
        return False
    words = _words(paragraphs[nth_paragraph - 1])
    return bool(words) and words[0].lower() == first_word.lower()


# --------------------------------------------------------------------------------------------------------------
# Instruction sentences


def _describe_keywords(args: dict[str, Any]) -> str:
    noun = "keyword" if len(args["keywords"]) == 1 else "keywords"
    return f"Include the {noun} {_quoted(args['keywords'])} in your response."


def _describe_keyword_frequency(args: dict[str, Any]) -> str:
    return (f'In your response, the word "{args["keyword"]}" should appear {args["relation"]} '
            f"{_times(args['frequency'])}.")


def _describe_forbidden(args: dict[str, Any]) -> str:
    noun = "word" if len(args["forbidden_words"]) == 1 else "words"
    return f"Do not include the {noun} {_quoted(args['forbidden_words'])} in your response."


def _describe_letter_frequency(args: dict[str, Any]) -> str:
    return (f'In your response, the letter "{args["letter"]}" should appear {args["relation"]} '
            f"{_times(args['frequency'])}.")


def _describe_sentence_count(args: dict[str, Any]) -> str:
    return f"Your response should contain {args['relation']} {_plural(args['num_sentences'], 'sentence')}."


def _describe_paragraph_count(args: dict[str, Any]) -> str:
    return (f"Your response should contain exactly {_plural(args['num_paragraphs'], 'paragraph')}, "
            "separated from each other by a blank line.")


def _describe_bullets(args: dict[str, Any]) -> str:
    return (f"Your answer must contain exactly {_plural(args['num_bullets'], 'bullet point')}. "
            "Use markdown bullet points such as: * This is a point.")


def _describe_numbered(args: dict[str, Any]) -> str:
    return (f"Your answer must contain a numbered list of exactly {_plural(args['num_items'], 'item')}, "
            "each on its own line starting like: 1. This is an item.")


def _describe_sections(args: dict[str, Any]) -> str:
    word = args["section_word"]
    return (f"Your response must have exactly {_plural(args['num_sections'], 'section')}. "
            f"Mark the beginning of each section with {word} X, such as: {word} 1.")


def _describe_highlights(args: dict[str, Any]) -> str:
    return (f"Highlight at least {_plural(args['num_highlights'], 'section')} in your answer with markdown, "
            "for example *highlighted section*.")


def _describe_capital_words(args: dict[str, Any]) -> str:
    return (f"In your response, words with all capital letters should appear {args['relation']} "
            f"{_times(args['frequency'])}.")


def _describe_placeholders(args: dict[str, Any]) -> str:
    return (f"The response must contain at least {_plural(args['num_placeholders'], 'placeholder')} "
            "represented by square brackets, such as [address].")


def _describe_language(args: dict[str, Any]) -> str:
    name = _LANGUAGES[args["language"]][0]
    return f"Your ENTIRE response should be in {name}, no other language is allowed."


def _describe_nth_paragraph(args: dict[str, Any]) -> str:
    return (f"There should be exactly {_plural(args['num_paragraphs'], 'paragraph')}, separated from each other "
            f"by a blank line. The {_ordinal(args['nth_paragraph'])} paragraph must start with the word "
            f'"{args["first_word"]}".')


# --------------------------------------------------------------------------------------------------------------
# Samplers


def _no_args(rng: random.Random) -> dict[str, Any]:
    return {}


def _sample_relation_count(rng: random.Random, key: str, low: int, high: int) -> dict[str, Any]:
    # "at most" is rarer: with tiny bounds it mostly asks the model to avoid something, which is less natural.
    return {"relation": "at least" if rng.random() < 0.75 else "at most", key: rng.randint(low, high)}


def _sample_nth_paragraph(rng: random.Random) -> dict[str, Any]:
    num_paragraphs = rng.randint(2, 3)
    return {"num_paragraphs": num_paragraphs, "nth_paragraph": rng.randint(1, num_paragraphs),
            "first_word": rng.choice(_FIRST_WORDS)}


def _sample_language(rng: random.Random) -> dict[str, Any]:
    # Mostly English: other languages are far beyond a small English policy and would only add noise.
    return {"language": "en" if rng.random() < 0.7 else rng.choice(["ru", "zh", "el"])}


# --------------------------------------------------------------------------------------------------------------
# Registry

# Pairs of types that cannot be asked together (symmetric): they contradict each other outright or leave
# almost no room for an answer (JSON vs any prose layout, a fixed opening vs another fixed opening, ...).
_JSON_CONFLICTS = ("paragraph_count", "bullet_count_exact", "numbered_list_count", "section_count", "title",
                 "highlighted_sections", "quotation_wrapped", "start_with_phrase", "end_with_phrase",
                 "ends_with_question", "postscript", "repeat_request", "two_responses", "first_word", "last_word",
                 "nth_paragraph_first_word", "sentence_count", "no_commas")
_ENGLISH_WORD_TYPES = ("all_lowercase", "all_uppercase", "capital_word_frequency", "keywords_include",
                       "keyword_frequency", "letter_frequency", "first_word", "last_word", "start_with_phrase",
                       "end_with_phrase", "repeat_request", "nth_paragraph_first_word", "section_count")
_CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (
    *(("json_format", other) for other in _JSON_CONFLICTS),
    *(("response_language", other) for other in _ENGLISH_WORD_TYPES),
    ("all_lowercase", "all_uppercase"),
    ("all_lowercase", "capital_word_frequency"),
    ("all_uppercase", "capital_word_frequency"),
    ("all_lowercase", "section_count"),
    ("word_count_min", "word_count_max"),
    ("bullet_count_exact", "numbered_list_count"),
    ("paragraph_count", "nth_paragraph_first_word"),
    ("paragraph_count", "section_count"),
    ("paragraph_count", "two_responses"),
    ("paragraph_count", "title"),
    ("nth_paragraph_first_word", "two_responses"),
    ("nth_paragraph_first_word", "title"),
    ("nth_paragraph_first_word", "section_count"),
    ("nth_paragraph_first_word", "first_word"),
    ("nth_paragraph_first_word", "start_with_phrase"),
    ("nth_paragraph_first_word", "repeat_request"),
    ("repeat_request", "start_with_phrase"),
    ("repeat_request", "first_word"),
    ("repeat_request", "quotation_wrapped"),
    ("repeat_request", "two_responses"),
    ("repeat_request", "title"),
    # The repeated request is task text that may hold commas, digits or a forbidden word.
    ("repeat_request", "no_commas"),
    ("repeat_request", "no_digits"),
    ("repeat_request", "forbidden_words"),
    ("start_with_phrase", "first_word"),
    ("start_with_phrase", "quotation_wrapped"),
    ("start_with_phrase", "title"),
    ("first_word", "title"),
    ("end_with_phrase", "last_word"),
    ("end_with_phrase", "ends_with_question"),
    ("end_with_phrase", "postscript"),
    ("end_with_phrase", "quotation_wrapped"),
    ("last_word", "postscript"),
    ("ends_with_question", "postscript"),
    ("ends_with_question", "quotation_wrapped"),
    ("postscript", "quotation_wrapped"),
    ("quotation_wrapped", "two_responses"),
    ("capital_word_frequency", "section_count"),  # "SECTION" itself is a capital word
    # Line-based layouts add "sentences" (each line counts), so they can break a sentence limit outright.
    *(("sentence_count", other) for other in ("bullet_count_exact", "numbered_list_count", "paragraph_count",
                                               "nth_paragraph_first_word", "section_count", "two_responses")),
    ("section_count", "no_digits"),
    ("numbered_list_count", "no_digits"),
)


def _conflicts_of(name: str) -> frozenset[str]:
    return frozenset(b for a, b in _CONFLICT_PAIRS if a == name) | frozenset(a for a, b in _CONFLICT_PAIRS if b == name)


def _spec(
    name: str,
    strict_check: Callable[..., bool],
    describe: Callable[[dict[str, Any]], str],
    sample_args: Callable[[random.Random], dict[str, Any]] = _no_args,
    args_model: type[VerifierArgs] = NoArgs,
) -> VerifierSpec:
    return VerifierSpec(name=name, check=_with_loose_mode(strict_check), describe=describe,
                        sample_args=sample_args, args_model=args_model, conflicts=_conflicts_of(name))


_SPECS = (
    _spec("keywords_include", _keywords_include, _describe_keywords,
          lambda rng: {"keywords": rng.sample(_KEYWORDS, rng.randint(1, 2))}, KeywordsArgs),
    _spec("keyword_frequency", _keyword_frequency, _describe_keyword_frequency,
          lambda rng: {"keyword": rng.choice(_KEYWORDS), "relation": "at least", "frequency": rng.randint(2, 3)},
          KeywordFrequencyArgs),
    _spec("forbidden_words", _forbidden_words, _describe_forbidden,
          lambda rng: {"forbidden_words": rng.sample(_FORBIDDEN, rng.randint(1, 3))}, ForbiddenWordsArgs),
    _spec("letter_frequency", _letter_frequency, _describe_letter_frequency,
          lambda rng: {"letter": rng.choice(_LETTERS), "relation": "at least", "frequency": rng.randint(3, 8)},
          LetterFrequencyArgs),
    _spec("word_count_min", _word_count_min, lambda args: f"Answer with at least {args['min_words']} words.",
          lambda rng: {"min_words": rng.choice((15, 20, 25, 30))}, MinWordsArgs),
    _spec("word_count_max", _word_count_max, lambda args: f"Answer with at most {args['max_words']} words.",
          lambda rng: {"max_words": rng.choice((30, 40, 50, 60))}, MaxWordsArgs),
    _spec("sentence_count", _sentence_count, _describe_sentence_count,
          lambda rng: {"relation": rng.choice(("at least", "at most")), "num_sentences": rng.randint(2, 5)},
          SentenceCountArgs),
    _spec("paragraph_count", _paragraph_count, _describe_paragraph_count,
          lambda rng: {"num_paragraphs": rng.randint(2, 3)}, ParagraphCountArgs),
    _spec("bullet_count_exact", _bullet_count_exact, _describe_bullets,
          lambda rng: {"num_bullets": rng.randint(2, 4)}, BulletCountArgs),
    _spec("numbered_list_count", _numbered_list_count, _describe_numbered,
          lambda rng: {"num_items": rng.randint(2, 4)}, NumberedListArgs),
    _spec("section_count", _section_count, _describe_sections,
          lambda rng: {"section_word": rng.choice(_SECTION_WORDS), "num_sections": rng.randint(2, 3)},
          SectionCountArgs),
    _spec("title", _title,
          lambda args: "Your answer must contain a title, wrapped in double angular brackets, such as <<my title>>."),
    _spec("highlighted_sections", _highlighted_sections, _describe_highlights,
          lambda rng: {"num_highlights": rng.randint(1, 3)}, HighlightArgs),
    _spec("json_format", _json_format,
          lambda args: "Your entire output should be wrapped in JSON format, with no text outside the JSON."),
    _spec("all_lowercase", _all_lowercase,
          lambda args: "Your entire response must be in lowercase letters, with no capital letters at all."),
    _spec("all_uppercase", _all_uppercase,
          lambda args: "Your entire response must be in English and in all capital letters."),
    _spec("capital_word_frequency", _capital_word_frequency, _describe_capital_words,
          lambda rng: _sample_relation_count(rng, "frequency", 1, 3), CapitalWordArgs),
    _spec("no_commas", _no_commas,
          lambda args: "In your entire response, refrain from the use of any commas."),
    _spec("no_digits", _no_digits,
          lambda args: "Do not use any digits in your response; write numbers out as words."),
    _spec("start_with_phrase", _start_with_phrase,
          lambda args: f'Start your response with the exact phrase "{args["phrase"]}".',
          lambda rng: {"phrase": rng.choice(_START_PHRASES)}, PhraseArgs),
    _spec("end_with_phrase", _end_with_phrase,
          lambda args: f'Finish your response with the exact phrase "{args["phrase"]}" and nothing after it.',
          lambda rng: {"phrase": rng.choice(_END_PHRASES)}, PhraseArgs),
    _spec("ends_with_question", _ends_with_question,
          lambda args: "End your response with a question."),
    _spec("quotation_wrapped", _quotation_wrapped,
          lambda args: "Wrap your entire response with double quotation marks."),
    _spec("placeholders", _placeholders, _describe_placeholders,
          lambda rng: {"num_placeholders": rng.randint(1, 3)}, PlaceholderArgs),
    _spec("postscript", _postscript,
          lambda args: f"At the end of your response, please add a postscript starting with {args['marker']}",
          lambda rng: {"marker": "P.S." if rng.random() < 0.8 else "P.P.S."}, PostscriptArgs),
    _spec("response_language", _response_language, _describe_language, _sample_language, LanguageArgs),
    _spec("repeat_request", _repeat_request,
          lambda args: (f'First repeat the request "{args["prompt_to_repeat"]}" word for word without change, '
                        "then give your answer."),
          lambda rng: {"prompt_to_repeat": rng.choice(_GENERIC_REQUESTS)}, RepeatRequestArgs),
    _spec("two_responses", _two_responses,
          lambda args: ("Give two different responses. Responses and only responses should be separated by "
                        "6 asterisk symbols: ******.")),
    _spec("first_word", _first_word,
          lambda args: f'The first word of your response must be "{args["word"]}".',
          lambda rng: {"word": rng.choice(_FIRST_WORDS)}, WordArgs),
    _spec("last_word", _last_word,
          lambda args: f'The last word of your response must be "{args["word"]}".',
          lambda rng: {"word": rng.choice(_LAST_WORDS)}, WordArgs),
    _spec("nth_paragraph_first_word", _nth_paragraph_first_word, _describe_nth_paragraph,
          _sample_nth_paragraph, NthParagraphArgs),
)

VERIFIERS: dict[str, VerifierSpec] = {spec.name: spec for spec in _SPECS}


# Instructions a longer answer can break once it meets them: an exact count or an upper limit. An answer the token
# limit cut off has not shown where it would stop, so meeting one of these is provisional (and, trained as an open
# target, it teaches the model to go on past the count: flywheel.quality quarantines such SFT rows).
_EXACT_OR_UPPER = frozenset({"word_count_max", "paragraph_count", "bullet_count_exact", "numbered_list_count",
                             "section_count", "two_responses", "nth_paragraph_first_word"})


def limits_length(constraint_type: str, args: Mapping[str, Any] | None = None) -> bool:
    """True when more text can undo a met instruction: an exact count (items, paragraphs, sections, two responses)
    or an upper limit (``word_count_max``, any ``relation: "at most"``)."""
    if constraint_type not in VERIFIERS:
        raise KeyError(f"unknown constraint type {constraint_type!r}; expected one of: {_allowed_types()}")
    return constraint_type in _EXACT_OR_UPPER or (args or {}).get("relation") == "at most"


def _check_registry() -> None:
    # Pure consistency check at import: a typo in a conflict pair or a length limit must not silently weaken
    # compatible() or limits_length().
    named = {"conflict pairs": {name for pair in _CONFLICT_PAIRS for name in pair}, "length limits": _EXACT_OR_UPPER}
    for what, names in named.items():
        unknown = sorted(names - VERIFIERS.keys())
        if unknown:
            raise RuntimeError(f"flywheel.verifiers: {what} name unknown verifier types: {', '.join(unknown)}")
    if len(VERIFIERS) != len(_SPECS):
        raise RuntimeError("flywheel.verifiers: two verifier specs share a name")


_check_registry()


def _allowed_types() -> str:
    return ", ".join(sorted(VERIFIERS))


# --------------------------------------------------------------------------------------------------------------
# Public models and functions


def _describe_args_error(constraint_type: str, error: ValidationError, args_model: type[VerifierArgs]) -> str:
    problems = []
    for detail in error.errors():
        location = ".".join(str(part) for part in detail["loc"]) or "args"
        if detail["type"] == "missing":
            problems.append(f"missing argument {location!r}")
        elif detail["type"] == "extra_forbidden":
            problems.append(f"unexpected argument {location!r}")
        else:
            message = detail["msg"].removeprefix("Value error, ")
            problems.append(f"bad argument {location!r}: {message}" if detail["loc"] else message)
    expected = ", ".join(args_model.model_fields) or "none"
    return f"constraint {constraint_type!r}: {'; '.join(problems)} (expected arguments: {expected})"


class Constraint(BaseModel):
    """One verifiable instruction: a registered type and its arguments (validated and normalized)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _validate_type_and_args(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            return data  # field validation reports the wrong shape
        constraint_type = data["type"]
        spec = VERIFIERS.get(constraint_type)
        if spec is None:
            raise ValueError(f"unknown constraint type {constraint_type!r}; allowed types: {_allowed_types()}")
        args = data.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ValueError(
                f"constraint {constraint_type!r}: args must be an object, got {type(args).__name__}"
            )
        try:
            validated = spec.args_model.model_validate(args)
        except ValidationError as error:
            raise ValueError(_describe_args_error(constraint_type, error, spec.args_model)) from None
        # Normalized (e.g. tuples become lists, text is stripped) so checks and saved files see one form.
        return {**data, "args": validated.model_dump()}

    def describe(self) -> str:
        return VERIFIERS[self.type].describe(self.args)

    def check(self, response: str, *, strict: bool = True) -> bool:
        return VERIFIERS[self.type].check(response, strict=strict, **self.args)


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    score: float = Field(ge=0.0, le=1.0)
    checks: list[bool]


def verify(constraints: Sequence[Constraint], response: str, *, strict: bool = True) -> Verdict:
    """Check a response against every constraint; ``score`` is the fraction satisfied."""
    if not constraints:
        raise ValueError("verify: no constraints given; a prompt with nothing to verify cannot be judged")
    checks = [constraint.check(response, strict=strict) for constraint in constraints]
    return Verdict(passed=all(checks), score=sum(checks) / len(checks), checks=checks)


def compatible(types: Iterable[str]) -> bool:
    """Whether these constraint types can be asked together: no conflicting pair and no type twice."""
    chosen = list(types)
    unknown = [name for name in chosen if name not in VERIFIERS]
    if unknown:
        raise ValueError(f"unknown constraint type {unknown[0]!r}; allowed types: {_allowed_types()}")
    # The same type twice can contradict itself (two different first words), so it counts as a conflict.
    if len(set(chosen)) != len(chosen):
        return False
    return not any(
        b in VERIFIERS[a].conflicts or a in VERIFIERS[b].conflicts
        for i, a in enumerate(chosen)
        for b in chosen[i + 1:]
    )


# The examples the instruction sentences give. An answer that writes "* This is a point" or "<<my title>>" meets the
# check by copying the prompt rather than following it; trained on, it teaches the copying (bench/README.md).
INSTRUCTION_EXAMPLES: dict[str, tuple[str, ...]] = {
    "bullet_count_exact": ("This is a point",),
    "numbered_list_count": ("This is an item",),
    "title": ("my title",),
    "highlighted_sections": ("highlighted section",),
}


def _requested_words(args: dict[str, Any]) -> list[str]:
    """The words an instruction asks the answer to use (phrases, keywords, a request to repeat), lower case."""
    texts: list[str] = []
    for value in args.values():
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            texts.extend(item for item in value if isinstance(item, str))
    return [word.lower() for text in texts for word in _words(text)]


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def echoed_instruction(constraints: Sequence[Constraint], response: str, *, ngram: int = 6) -> str | None:
    """What of its instructions' wording ``response`` copies instead of following them, or None: the example an
    instruction of its type gives (``INSTRUCTION_EXAMPLES``), or ``ngram`` consecutive words of an instruction's
    sentence that are not words it asks for (a phrase to start or end with, keywords, a request to repeat)."""
    if ngram < 2:
        raise ValueError(f"echoed_instruction: ngram must be at least 2, got {ngram}")
    lowered = response.lower()
    words = [word.lower() for word in _words(response)]
    answer_grams = _ngrams(words, ngram)
    for constraint in constraints:
        requested = _requested_words(constraint.args)
        for example in INSTRUCTION_EXAMPLES.get(constraint.type, ()):
            if re.search(rf"\b{re.escape(example.lower())}\b", lowered):
                return f'the example "{example}"'
        asked = _ngrams(requested, ngram)
        instruction = [word.lower() for word in _words(constraint.describe())]
        for gram in sorted(_ngrams(instruction, ngram) - asked):
            if gram in answer_grams:
                return f'"{" ".join(gram)}" from "{constraint.describe()}"'
    return None
