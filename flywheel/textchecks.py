"""Row-level text checks of the quality gate, as pure scorers.

Every check has one signature, ``check(text, limits) -> bool`` (True: the row is flagged), and treats a
non-string (None, NaN) as "not flagged": missing text is the not-null expectation's business. The quality
gate turns each into a derived boolean column that a built-in Great Expectations expectation validates, so
each check shows in Data Docs and names the rows it quarantines.

``count_tokens`` is the gate's token count: words and punctuation marks (``\\w+|[^\\w\\s]``). It approximates a
BPE tokenizer without loading one: on SmolLM2-135M-Instruct's own answers it gives about 0.95 of the
tokenizer's count (half of the answers within 7%); it undercounts rare words, which BPE splits further.

Language identification uses ``langid`` (a naive Bayes model over byte n-grams shipped in the package:
deterministic, no seed, no download), loaded once per process on first use. The package ships its model as a
base64 bz2 pickle that takes about 1.5 s to decode on every load; the decoded arrays are kept in a cache
(``$FLYWHEEL_LANGID_CACHE`` or ``~/.cache/flywheel/langid``, keyed by the model's sha256), read in milliseconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
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
# A unit of 1-4 characters followed by itself at least once (in text without whitespace): symbol loops.
_UNIT_RUN_RE = re.compile(r"(\S{1,4}?)\1+")
_WHITESPACE_RE = re.compile(r"\s+")
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


LANGID_CACHE_ENV = "FLYWHEEL_LANGID_CACHE"
# What langid's LanguageIdentifier is built from: naive Bayes weights (features x languages), class priors, the
# language codes, and the byte automaton's transitions and outputs.
LangidModel = tuple[Any, Any, list[str], Any, dict[int, tuple[int, ...]]]


def langid_cache_dir() -> Path:
    return Path(os.environ.get(LANGID_CACHE_ENV) or Path.home() / ".cache" / "flywheel" / "langid")


@lru_cache(maxsize=1)
def _language_identifier() -> Any:
    from langid.langid import model

    return langid_identifier(langid_model(model, langid_cache_dir()))


def langid_identifier(model: LangidModel) -> Any:
    """langid's ``LanguageIdentifier`` over ``model``, normalised probabilities as ``langid.classify`` reports."""
    from langid.langid import LanguageIdentifier

    nb_ptc, nb_pc, classes, nextmove, output = model
    return LanguageIdentifier(nb_ptc, nb_pc, nb_ptc.shape[0], classes, nextmove, output, norm_probs=True)


def langid_model(modelstring: bytes | str, cache_dir: Path) -> LangidModel:
    """langid's model as ``LanguageIdentifier`` takes it (what ``from_modelstring`` decodes), from the cache when
    it holds this model string's arrays; otherwise decoded and written there. A cache that cannot be read is
    rebuilt; one that cannot be written leaves the decoded model in use."""
    import numpy as np

    encoded = modelstring.encode("ascii") if isinstance(modelstring, str) else modelstring
    key = hashlib.sha256(encoded).hexdigest()[:32]
    path = Path(cache_dir) / f"langid-{key}.npz"
    try:
        return _read_langid_arrays(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # absent, truncated or foreign: decoded again and (re)written below
    import base64
    import bz2
    import pickle

    nb_ptc, nb_pc, classes, nextmove, output = pickle.loads(bz2.decompress(base64.b64decode(encoded)))
    keys = sorted(output)
    arrays = {
        "nb_ptc": np.asarray(nb_ptc, dtype=np.float32), "nb_pc": np.asarray(nb_pc, dtype=np.float32),
        "classes": np.asarray(classes, dtype=str), "nextmove": np.asarray(nextmove, dtype=np.uint16),
        "output_keys": np.asarray(keys, dtype=np.int64),
        "output_lengths": np.asarray([len(output[k]) for k in keys], dtype=np.int64),
        "output_values": np.asarray([v for k in keys for v in output[k]], dtype=np.int64),
    }
    from flywheel.models import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        atomic_write_bytes(path, buffer.getvalue())  # whole or absent, no temporary file left on failure
    except OSError:
        pass  # a read-only or full cache location: this process uses the decoded model uncached
    return _langid_from_arrays(arrays)


def _read_langid_arrays(path: Path) -> LangidModel:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in ("nb_ptc", "nb_pc", "classes", "nextmove", "output_keys",
                                                "output_lengths", "output_values")}
    if (arrays["nb_ptc"].size % max(arrays["nb_pc"].size, 1) or arrays["classes"].size != arrays["nb_pc"].size
            or arrays["output_lengths"].sum() != arrays["output_values"].size
            or arrays["output_lengths"].size != arrays["output_keys"].size):
        raise ValueError(f"{path}: inconsistent langid arrays")
    return _langid_from_arrays(arrays)


def _langid_from_arrays(arrays: dict[str, Any]) -> LangidModel:
    import array

    import numpy as np

    nb_pc = arrays["nb_pc"]
    nb_ptc = arrays["nb_ptc"].reshape(-1, nb_pc.size)
    # langid walks its tokenizer's automaton one byte at a time in Python: array.array indexes faster than numpy.
    nextmove = array.array("H", arrays["nextmove"].astype(np.uint16).tobytes())
    values = arrays["output_values"].tolist()
    ends = np.cumsum(arrays["output_lengths"]).tolist()
    output = {key: tuple(values[end - length:end]) for key, length, end in
              zip(arrays["output_keys"].tolist(), arrays["output_lengths"].tolist(), ends)}
    return nb_ptc, nb_pc, arrays["classes"].tolist(), nextmove, output


@lru_cache(maxsize=4096)  # a round's pairs and SFT rows repeat its samples' responses: each is identified once
def detect_language(text: str) -> str:
    """The most likely language of ``text`` (ISO 639-1 code), by langid.

    Text without a lowercase letter is identified as its lowercase: langid's byte n-grams are case-sensitive and
    learned from mixed-case text: in one benchmark run's datasets it called 8 of 56 all-capitals English texts
    Norwegian or Chinese (answers that met "in all capital letters" were quarantined), and none once lowercased."""
    if not any(char.islower() for char in text):
        text = text.lower()
    return str(_language_identifier().classify(text)[0])


def max_unit_run(text: Any) -> int:
    """The longest run of one unit of 1-4 characters repeated back to back, whitespace ignored: a loop of symbols
    ("⚖⚖⚖", "<<<<", "* * *") that word n-grams do not see, having no words (0 for a non-string)."""
    if not isinstance(text, str):
        return 0
    compact = _WHITESPACE_RE.sub("", text)
    return max((len(m.group(0)) // len(m.group(1)) for m in _UNIT_RUN_RE.finditer(compact)), default=0)


# --------------------------------------------------------------------------- the checks (one signature)


def is_refusal(text: Any, limits: TextLimits) -> bool:
    """The response opens by declining the request ("I'm sorry, but I can't help with that")."""
    return isinstance(text, str) and bool(_REFUSAL_RE.search(text[:_REFUSAL_WINDOW]))


def is_repetitive(text: Any, limits: TextLimits) -> bool:
    """Degenerate repetition: some word n-gram occurs more than ``repetition_max_repeats`` times, or a unit of 1-4
    characters runs back to back longer than such a loop of words would (``repetition_ngram`` x
    ``repetition_max_repeats`` units: 16 by default; on about 1,500 answers of the real model it flagged only loops)."""
    return (max_ngram_repeats(text, limits.repetition_ngram) > limits.repetition_max_repeats
            or max_unit_run(text) > limits.repetition_ngram * limits.repetition_max_repeats)


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
