"""Row-level text checks of the quality gate, as pure scorers.

Every check has one signature, ``check(text, limits) -> bool`` (True: the row is flagged), and treats a
non-string (None, NaN) as "not flagged": missing text is the not-null expectation's business. The quality
gate turns each into a derived boolean column that a built-in Great Expectations expectation validates, so
each check shows in Data Docs and names the rows it quarantines.

``count_tokens`` is the gate's token count: words and punctuation marks (``\\w+|[^\\w\\s]``). It approximates a
BPE tokenizer without loading one: on SmolLM2-135M-Instruct's own answers it gives about 0.95 of the
tokenizer's count (half of the answers within 7%); it undercounts rare words, which BPE splits further.

Language identification uses ``langid`` (a naive Bayes model over byte n-grams shipped in the package:
deterministic, no seed, no download), loaded once per process on first use (about 2 s).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CHECKS",
    "TextLimits",
    "count_tokens",
    "detect_language",
    "is_refusal",
    "is_repetitive",
    "max_ngram_repeats",
    "NgramIndex",
    "shares_ngram",
    "wrong_language",
]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_WORD_RE = re.compile(r"\w+")
_LETTER_RE = re.compile(r"[^\W\d_]")
# Refusal openings of chat models, looked for in the first sentence or two of a response.
_REFUSAL_RE = re.compile(
    r"\b(?:"
    r"i(?:'m| am) sorry,? (?:but )?i (?:can(?:'|no)t|cannot|won't|am unable|'m unable|am not able)"
    r"|i (?:can(?:'|no)?t|cannot|won't|am unable to|'m unable to|am not able to|'m not able to) "
    r"(?:help|assist|comply|provide|do that|fulfil+|complete|answer|write|create|support)"
    r"|as an ai(?: language model)?,? i (?:can(?:'|no)t|cannot|don't|do not|am unable)"
    r"|i must (?:decline|refuse)"
    r"|i(?:'m| am) not (?:able|allowed|permitted) to (?:help|assist|provide|answer|do)"
    r")\b",
    re.IGNORECASE,
)
_REFUSAL_WINDOW = 200  # characters from the start where a refusal is looked for


class TextLimits(BaseModel):
    """The parameters of the text checks (filled from ``QualityConfig`` and the round's prompts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    language: str | None = Field("en", description="Expected language (ISO 639-1); None: unchecked.")
    language_min_letters: int = Field(40, ge=1, description="Shorter responses pass the language check.")
    repetition_ngram: int = Field(4, ge=1, description="Word n-gram size of the repetition check.")
    repetition_max_repeats: int = Field(4, ge=1, description="A word n-gram may occur this often, not more.")
    decontamination_ngram: int = Field(25, ge=1, description="Words an n-gram must span to count as shared.")


def count_tokens(text: Any) -> int | None:
    """Approximate token count: words and punctuation marks; None for a non-string."""
    if not isinstance(text, str):
        return None
    return len(_TOKEN_RE.findall(text))


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def max_ngram_repeats(text: Any, n: int) -> int:
    """How often the most frequent word ``n``-gram of ``text`` occurs (0 when it has fewer than n words)."""
    if not isinstance(text, str):
        return 0
    grams = _ngrams(_words(text), n)
    return max(Counter(grams).values()) if grams else 0


@lru_cache(maxsize=1)
def _language_identifier() -> Any:
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def detect_language(text: str) -> str:
    """The most likely language of ``text`` (ISO 639-1 code), by langid."""
    return str(_language_identifier().classify(text)[0])


# --------------------------------------------------------------------------- the checks (one signature)


def is_refusal(text: Any, limits: TextLimits) -> bool:
    """The response opens by declining the request ("I'm sorry, but I can't help with that")."""
    return isinstance(text, str) and bool(_REFUSAL_RE.search(text[:_REFUSAL_WINDOW]))


def is_repetitive(text: Any, limits: TextLimits) -> bool:
    """Degenerate repetition: some word n-gram occurs more than ``repetition_max_repeats`` times."""
    return max_ngram_repeats(text, limits.repetition_ngram) > limits.repetition_max_repeats


def wrong_language(text: Any, limits: TextLimits) -> bool:
    """The response is identified as another language than expected; too short to tell (fewer than
    ``language_min_letters`` letters) or no expected language: not flagged."""
    if not isinstance(text, str) or limits.language is None:
        return False
    if len(_LETTER_RE.findall(text)) < limits.language_min_letters:
        return False
    return detect_language(text) != limits.language


CHECKS: dict[str, Callable[[Any, TextLimits], bool]] = {
    "refusal": is_refusal,
    "repetitive": is_repetitive,
    "wrong_language": wrong_language,
}


# --------------------------------------------------------------------------- decontamination


class NgramIndex(BaseModel):
    """Word n-grams of a set of texts (the evaluation prompts), for :func:`shares_ngram`."""

    model_config = ConfigDict(frozen=True)
    n: int
    grams: frozenset[tuple[str, ...]]
    texts: tuple[str, ...]  # every text as " word word ... " (for texts shorter than n words)

    @classmethod
    def build(cls, texts: list[str], n: int) -> NgramIndex:
        grams: set[tuple[str, ...]] = set()
        joined: list[str] = []
        for text in texts:
            if not isinstance(text, str):
                continue
            words = _words(text)
            grams.update(_ngrams(words, n))
            if words:
                joined.append(f" {' '.join(words)} ")
        return cls(n=n, grams=frozenset(grams), texts=tuple(sorted(set(joined))))


def shares_ngram(text: Any, index: NgramIndex) -> bool:
    """``text`` shares a word n-gram (``index.n`` words) with an indexed text. When either is shorter than
    n words but at least half as long, its whole word sequence occurring inside the other counts instead (so
    short near-copies count, while a two-word prompt does not match every text that contains its words)."""
    if not isinstance(text, str):
        return False
    words = _words(text)
    shortest = max(1, (index.n + 1) // 2)
    if len(words) >= index.n and not index.grams.isdisjoint(_ngrams(words, index.n)):
        return True
    padded = f" {' '.join(words)} "
    if shortest <= len(words) < index.n and any(padded in other for other in index.texts):
        return True
    return any(shortest <= len(other.split()) < index.n and other in padded for other in index.texts)
