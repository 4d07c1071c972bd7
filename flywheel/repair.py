"""Verifier-guided repair: mechanical fixes for the instruction types that have one, applied to failed answers.

The programmatic counterpart of SPaR's minimal refinements. A fix changes only what its instruction governs (the
case, the commas, a missing opening or closing phrase, an answer cut off mid-sentence), so the pair
(repaired, original) differs in what the instruction cares about and little else: a clean DPO signal; a repaired
answer that passes every check is also an SFT target. This is also how a small policy gets examples of the
instructions it never meets on its own (asked for all capitals, SmolLM2-135M never answers in capitals, so
rejection sampling alone has nothing to learn from).

Structure is repaired too: a list with surplus items loses them, and prose becomes the asked number of bullets,
numbered items, sections or paragraphs by grouping its sentences, so the policy sees structured answers that fit in
its token limit (sampled ones are mostly cut off before their last item). Missing keywords and placeholders get a
sentence of their own after the first, digits are written out, and a missing last word gets a closing sentence that
ends on it. Types without a mechanical fix (a minimum length, keyword and letter counts, the language, two
responses) are left alone, and the verifier stays the judge: a repair is kept only when it satisfies more
instructions than the original and breaks none the original met. Every fixer is a pure function
``(response, **args) -> response``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel.prompts import Prompt, unit_hash
from flywheel.textchecks import NgramIndex, shares_ngram
from flywheel.verifiers import (
    BULLET_MARK,
    NUMBER_MARK,
    VERIFIERS,
    _SECTION_WORDS,
    Constraint,
    _paragraphs,
    _sentences,
    _whole_word,
    _words,
    capital_word_count,
    compatible,
    echoed_instruction,
    highlight_count,
    placeholder_count,
    section_mark,
    verify,
)

if TYPE_CHECKING:
    import pandas as pd

    from flywheel.config import RepairConfig

Fixer = Callable[..., str]

# A sentence ends at ., ! or ? (optionally closed by a quote or bracket), or at the end of a line.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)|\n")


def trim_unfinished(response: str) -> str:
    """The answer up to its last complete sentence (or line): what was cut off at the token limit is dropped.
    Last lines without a letter (a list marker such as "2." whose item the limit cut off) go too. An answer without
    any sentence end is returned as it is."""
    text = response.rstrip()
    ends = [match.end() for match in _SENTENCE_END.finditer(text)]
    if not ends:
        return text
    lines = text[: ends[-1]].rstrip().split("\n")
    while len(lines) > 1 and not re.search(r"[^\W\d_]", lines[-1]):
        lines.pop()
    return "\n".join(lines).rstrip()


def shorten(response: str, max_words: int) -> str:
    """The answer's leading whole sentences (or lines) that fit in ``max_words`` words, at least its first; a last
    line without a letter goes, as in ``trim_unfinished``. An answer within the limit is returned as it is."""
    text = response.rstrip()
    if len(_words(text)) <= max_words:
        return text
    cut, words, start = None, 0, 0
    for match in _SENTENCE_END.finditer(text):
        # Sentence ends sit on punctuation or line breaks, so no word straddles two segments.
        words += len(_words(text[start: match.end()]))
        start = match.end()
        if words > max_words and cut is not None:
            break
        cut = match.end()
    return text if cut is None else trim_unfinished(text[:cut])


def _join_sentence(text: str, addition: str) -> str:
    text = text.rstrip()
    if text and text[-1] not in ".!?\"'”’)]:":
        text += "."
    return f"{text} {addition}" if text else addition


def _fix_forbidden_words(response: str, *, forbidden_words: list[str]) -> str:
    for word in forbidden_words:
        # The verifier's own whole-word match, with the space after it, so no double space is left.
        response = re.sub(rf"{_whole_word(word).pattern}[ \t]?", "", response, flags=re.IGNORECASE)
    return response


def _fix_no_commas(response: str) -> str:
    return response.replace("，", "").replace(",", "")


_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(number: int) -> str:
    """0-9999 in English words ("forty-two", "one thousand two hundred five"), without commas."""
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    thousands, rest = divmod(number, 1000)
    return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")


def _fix_no_digits(response: str) -> str:
    # Numbers up to 9999 are written out; a longer run of digits (a phone number, a code) digit by digit.
    def spelled(match: re.Match[str]) -> str:
        digits = match.group(0)
        if len(digits) <= 4:
            return number_words(int(digits))
        return " ".join(_ONES[int(digit)] for digit in digits)

    return re.sub(r"\d+", spelled, response)


def _and_joined(items: Sequence[str]) -> str:
    # Joined without commas, so the fix never breaks a no-commas instruction.
    return " and ".join(items)


def _after_first_sentence(response: str, addition: str) -> str:
    """``addition`` as a sentence of its own after the answer's first sentence: it leaves the opening (a start
    phrase, a first word) and the ending (an end phrase, a postscript) as they are, and a word limit that keeps
    whole sentences from the start keeps it too."""
    # After a letter: "1. " opening a numbered item is not a sentence end.
    match = re.search(r"(?<=[^\W\d_])[.!?][\"'”’)\]]*[ \t]+(?=\S)", response)
    if match is None:
        return _join_sentence(response, addition)
    return f"{response[:match.end()]}{addition} {response[match.end():]}"


def _fix_keywords_include(response: str, *, keywords: list[str]) -> str:
    missing = [word for word in keywords if not _whole_word(word).search(response)]
    return _after_first_sentence(response, f"Key words: {_and_joined(missing)}.")


_PLACEHOLDER_NAMES = ("name", "date", "place", "address", "email", "phone")


def _fix_placeholders(response: str, *, num_placeholders: int) -> str:
    present = placeholder_count(response)
    names = [name for name in _PLACEHOLDER_NAMES if f"[{name}]" not in response.lower()]
    missing = names[: max(num_placeholders - present, 0)] or names[:1]
    return _after_first_sentence(response, f"Fill in {_and_joined(f'[{name}]' for name in missing)} as needed.")


def _fix_capital_word_frequency(response: str, *, relation: str, frequency: int) -> str:
    # At least: the first longer words (four letters or more) are set in capitals, for emphasis. At most: the
    # capital words after the allowed number lose their capitals but the first letter.
    if relation == "at least":
        needed = frequency - capital_word_count(response)

        def emphasised(match: re.Match[str]) -> str:
            nonlocal needed
            word = match.group(0)
            if needed > 0 and len(word) >= 4 and not word.isupper():
                needed -= 1
                return word.upper()
            return word

        return re.sub(r"[^\W\d_]+", emphasised, response)
    allowed = frequency

    def tamed(match: re.Match[str]) -> str:
        nonlocal allowed
        word = match.group(0)
        if len(word) >= 2 and word.isupper():
            if allowed > 0:
                allowed -= 1
                return word
            return word[:1] + word[1:].lower()
        return word

    return re.sub(r"[^\W\d_]+", tamed, response)


def _fix_sentence_count(response: str, *, relation: str, num_sentences: int) -> str:
    # At most: the first sentences, counted as the check counts them. At least: nothing to add that the answer
    # did not say, so it is returned as it is.
    if relation != "at most":
        return response
    return " ".join(_sentences(response)[:num_sentences])


def _fix_word_count_max(response: str, *, max_words: int) -> str:
    # Whole sentences while they fit; a first sentence that alone is too long is cut at the word limit.
    kept: list[str] = []
    words = 0
    for sentence in re.split(r"(?<=[.!?])\s+", response.strip()):
        count = len(_words(sentence))  # counted as the word-limit check counts
        if words + count > max_words:
            break
        kept.append(sentence)
        words += count
    if kept:
        return " ".join(kept)
    return " ".join(response.split()[:max_words])


# A list item opens a line as the list checks count them.
_BULLET_ITEM = re.compile(rf"^{BULLET_MARK}(?=\S)")
_NUMBERED_ITEM = re.compile(rf"^{NUMBER_MARK}(?=\S)")
# A section marker of the default's section words, as the section check finds one.
_SECTION_MARK = section_mark(*_SECTION_WORDS)
# The marker at the start of the text, with its markdown and punctuation after it.
_SECTION_MARKER = re.compile(rf"^{_SECTION_MARK}[\W_]*")


def _units(text: str) -> tuple[str, list[str]]:
    """An answer as (introduction, units): its lines, or its sentences when it is one line. A title (<<...>>) and a
    first line ending in a colon ("Here are three tips:") are kept as the introduction; list markers are dropped from
    the units, and units without a letter (a stray "2.") are dropped."""
    lines = [line.strip() for line in text.strip().split("\n") if line.strip()]
    intro: list[str] = []
    while len(lines) > 1 and (lines[0].endswith(":") or re.fullmatch(r"<<[^\n<>]*>>", lines[0])):
        intro.append(lines.pop(0))
    if len(lines) == 1:
        lines = [part for part in re.split(r"(?<=[.!?])\s+", lines[0]) if part.strip()]
    units = [_NUMBERED_ITEM.sub("", _BULLET_ITEM.sub("", line)).strip() for line in lines]
    return "\n".join(intro), [unit for unit in units if re.search(r"[^\W\d_]", unit)]


def _grouped(units: list[str], count: int) -> list[str]:
    """``units`` in ``count`` consecutive groups of near-equal size, each joined into one text."""
    bounds = [len(units) * index // count for index in range(count + 1)]
    return [" ".join(units[bounds[i]:bounds[i + 1]]) for i in range(count)]


def _fix_list(response: str, count: int, marker: Callable[[int], str], item: re.Pattern[str]) -> str:
    """Exactly ``count`` list items: surplus items of an existing list are dropped; an answer without such a list
    (prose, or a list in the other style) becomes one, its sentences or lines grouped into ``count`` items.
    An answer with too few sentences for the items is returned as it is: there is nothing to split."""
    lines = response.strip().split("\n")
    items = [index for index, line in enumerate(lines) if item.match(line)]
    if len(items) > count:
        surplus = set(items[count:])
        return "\n".join(line for index, line in enumerate(lines) if index not in surplus).strip()
    if items:
        return response
    intro, units = _units(response)
    if len(units) < count:
        return response
    body = "\n".join(f"{marker(index)}{text}" for index, text in enumerate(_grouped(units, count), start=1))
    return f"{intro}\n{body}" if intro else body


def _fix_bullet_count_exact(response: str, *, num_bullets: int) -> str:
    return _fix_list(response, num_bullets, lambda _: "* ", _BULLET_ITEM)


def _fix_numbered_list_count(response: str, *, num_items: int) -> str:
    return _fix_list(response, num_items, lambda index: f"{index}. ", _NUMBERED_ITEM)


def _fix_section_count(response: str, *, section_word: str, num_sections: int) -> str:
    # Markers in another case ("Part 1" for PART) take the asked case; surplus sections are dropped from their
    # marker on; an answer without markers is split into sections.
    marker = re.compile(rf"^{section_mark(section_word)}")
    recased = re.sub(rf"(?im)^([\W_]*){re.escape(section_word)}(?=\s+\d)", lambda m: m.group(1) + section_word,
                     response.strip())
    lines = recased.split("\n")
    starts = [index for index, line in enumerate(lines) if marker.match(line)]
    if len(starts) > num_sections:
        return "\n".join(lines[:starts[num_sections]]).strip()
    if starts:
        return recased
    intro, units = _units(response)
    if len(units) < num_sections:
        return response
    sections = [f"{section_word} {index}\n{text}" for index, text in enumerate(_grouped(units, num_sections), start=1)]
    return "\n\n".join([intro, *sections] if intro else sections)


def _fix_paragraph_count(response: str, *, num_paragraphs: int) -> str:
    # Surplus paragraphs are dropped; too few become the asked number by grouping the answer's lines or sentences.
    paragraphs = _paragraphs(response.strip())  # as the check counts them
    if len(paragraphs) > num_paragraphs:
        return "\n\n".join(paragraphs[:num_paragraphs])
    intro, units = _units(response)
    if len(units) < num_paragraphs:
        return response
    groups = _grouped(units, num_paragraphs)
    if intro:
        groups[0] = f"{intro}\n{groups[0]}"
    return "\n\n".join(groups)


def _fix_highlighted_sections(response: str, *, num_highlights: int) -> str:
    # The first sentences not yet marked up are set in bold (inside a list item, after its marker): bold, not
    # italics, because a single asterisk next to a bullet's asterisk would not read as a highlight.
    missing = num_highlights - highlight_count(response)
    lines = response.split("\n")
    for index, line in enumerate(lines):
        if missing <= 0:
            break
        prefix = (_BULLET_ITEM.match(line) or _NUMBERED_ITEM.match(line) or re.match(r"[ \t]*", line)).group(0)
        parts = re.split(r"(?<=[.!?])(\s+)", line[len(prefix):])
        for position in range(0, len(parts), 2):
            text = parts[position]
            if missing > 0 and "*" not in text and _words(text):
                parts[position] = f"**{text.strip()}**"
                missing -= 1
        lines[index] = prefix + "".join(parts)
    return "\n".join(lines)


def _fix_title(response: str) -> str:
    # The title is the answer's own opening words (up to the first punctuation, at most six): the fix adds the
    # markup the check asks for, not new content.
    # A list's or section's marker is not a title: "<<SECTION 1>>" would count as one more section.
    text = _NUMBERED_ITEM.sub("", _BULLET_ITEM.sub("", _SECTION_MARKER.sub("", response.strip())))
    opening = re.split(r"[^\w\s'’-]", text, maxsplit=1)[0]
    words = opening.split()[:6] or ["Answer"]
    return f"<<{' '.join(word[:1].upper() + word[1:] for word in words)}>>\n\n{response.strip()}"


# A first line that opens a structure: a list item, a markdown heading, a section marker, a title. What the
# opening fixes add goes on a line of its own before it ("Yes, 1. Sleep well." was trained before), one newline and
# not a blank line, so the paragraphs stay as many as they were.
_STRUCTURE_OPENING = re.compile(rf"{BULLET_MARK}|{NUMBER_MARK}|#|<<|{_SECTION_MARK}")


def _fix_start_with_phrase(response: str, *, phrase: str) -> str:
    opening = phrase.strip()
    text = response.lstrip()
    separator = "\n" if _STRUCTURE_OPENING.match(text) else " "
    return f"{opening}{'' if opening[-1] in '.!?:,' else '.'}{separator}{text}"


def _fix_first_word(response: str, *, word: str) -> str:
    text = response.lstrip()
    if not text:
        return word.strip()
    if _STRUCTURE_OPENING.match(text):
        return f"{word.strip()}:\n{text}"
    # "Today, we ..." but "Today, I ..." and "Today, AI ...": the pronoun and a word in capitals keep their case.
    opening = text if re.match(r"(?:I|[A-Z]{2,})\b", text) else f"{text[:1].lower()}{text[1:]}"
    return f"{word.strip()}, {opening}"


def _fix_end_with_phrase(response: str, *, phrase: str) -> str:
    return _join_sentence(trim_unfinished(response), phrase.strip())


def _fix_ends_with_question(response: str) -> str:
    return _join_sentence(trim_unfinished(response), "Would you like to know more?")


def _fix_repeat_request(response: str, *, prompt_to_repeat: str) -> str:
    return f"{prompt_to_repeat.strip()}\n\n{response.lstrip()}"


def _fix_last_word(response: str, *, word: str) -> str:
    # One closing template for every word, so the policy learns to copy the word as it copies an end phrase: with a
    # natural sentence per word ("Feel free to ask again.") held-out last words did not move in three rounds.
    text = trim_unfinished(response)
    # After a closing question (asked for too) the template stays a question.
    return _join_sentence(text, f"One last word: {word.strip()}{'?' if text.rstrip().endswith('?') else '.'}")


def _fix_json_format(response: str) -> str:
    import json

    text = trim_unfinished(response)
    # After the case fixes (upper-casing JSON would break its escapes), so the key takes the answer's case.
    return json.dumps({"ANSWER" if text.isupper() else "answer": text}, ensure_ascii=False)


def _fix_postscript(response: str, *, marker: str) -> str:
    return f"{trim_unfinished(response)}\n\n{marker} I hope this helps."


def _fix_all_lowercase(response: str) -> str:
    return response.lower()


def _fix_all_uppercase(response: str) -> str:
    return response.upper()


def _fix_quotation_wrapped(response: str) -> str:
    return f'"{response.strip()}"'


# The fixes that give an answer a real ending: one the token limit cut off ends its turn after them.
ENDING_FIXES = frozenset({"postscript", "end_with_phrase", "ends_with_question", "last_word", "quotation_wrapped",
                          "json_format"})

# Applied in this order: edits inside the text first, then its structure (lists, sections, then highlights inside
# them), then what is added at its start and end, then the case of the whole (so added phrases are in the asked case
# too), and the quotation marks around everything last.
FIXERS: dict[str, Fixer] = {
    "forbidden_words": _fix_forbidden_words,
    "no_commas": _fix_no_commas,
    "no_digits": _fix_no_digits,
    "keywords_include": _fix_keywords_include,
    "placeholders": _fix_placeholders,
    "sentence_count": _fix_sentence_count,
    "word_count_max": _fix_word_count_max,
    "bullet_count_exact": _fix_bullet_count_exact,
    "numbered_list_count": _fix_numbered_list_count,
    "section_count": _fix_section_count,
    "paragraph_count": _fix_paragraph_count,
    "highlighted_sections": _fix_highlighted_sections,
    "start_with_phrase": _fix_start_with_phrase,
    "first_word": _fix_first_word,
    "title": _fix_title,
    "repeat_request": _fix_repeat_request,
    "postscript": _fix_postscript,
    "end_with_phrase": _fix_end_with_phrase,
    "ends_with_question": _fix_ends_with_question,
    "last_word": _fix_last_word,
    "all_lowercase": _fix_all_lowercase,
    "all_uppercase": _fix_all_uppercase,
    "capital_word_frequency": _fix_capital_word_frequency,
    "quotation_wrapped": _fix_quotation_wrapped,
    "json_format": _fix_json_format,
}


def repair(constraints: Sequence[Constraint], response: str, *, types: Sequence[str] | None = None,
           trim: bool = True, max_words: int | None = None) -> str:
    """``response`` with the fixes of every instruction it fails (of ``types``, default all with a fixer), applied
    in ``FIXERS`` order; then the in-place fixes (``_RESTORING``) again for any of their instructions a later fix
    broke, the answer's own met ones included, where that costs no other instruction. ``trim``: an answer that
    needs any fix is also cut back to its last complete sentence; ``max_words``: an answer that fails an instruction
    on how it ends (``ENDING_FIXES``) is also cut to its leading sentences within that many words (``shorten``), so
    the ending it gets fits inside the token limit."""
    allowed = set(FIXERS if types is None else types)
    failing = [c for c in constraints if c.type in allowed and not c.check(response, strict=True)]
    if not failing:
        return response
    repaired = trim_unfinished(response) if trim else response
    if max_words is not None and any(c.type in ENDING_FIXES for c in failing):
        repaired = shorten(repaired, max_words)
    by_type = {c.type: c for c in failing}
    for name, fixer in FIXERS.items():
        constraint = by_type.get(name)
        if constraint is not None and not constraint.check(repaired, strict=True):
            repaired = fixer(repaired, **constraint.args)
    return _restored(constraints, allowed, repaired)


# Fixes that edit words or letters in place. A later fix can undo one ("Yes, ..." after the comma fix) or break the
# instruction an answer met before (a lower-case answer given "Would you like to know more?"): they run again last.
_RESTORING = ("forbidden_words", "no_commas", "all_lowercase", "all_uppercase")


def _restored(constraints: Sequence[Constraint], allowed: set[str], repaired: str) -> str:
    for name in _RESTORING:
        constraint = next((c for c in constraints if c.type == name and name in allowed), None)
        if constraint is None or constraint.check(repaired, strict=True):
            continue
        fixed = FIXERS[name](repaired, **constraint.args)
        # Not at the cost of another instruction (capitals inside a JSON answer turn its "\n" into "\N").
        kept = [c for c in constraints if c is not constraint and c.check(repaired, strict=True)]
        if all(c.check(fixed, strict=True) for c in kept):
            repaired = fixed
    return repaired


@dataclass(frozen=True)
class RepairResult:
    pairs: Any  # DataFrame: REFINE_PAIR_COLUMNS, (repaired, original) per prompt
    sft: Any  # DataFrame: REFINE_SFT_COLUMNS, repaired answers that pass every instruction
    stats: dict[str, float] = field(default_factory=dict)


def _repaired(constraints: Sequence[Constraint], response: str, settings: RepairConfig) -> list[str]:
    """The repairs to try, best first: shortened (``max_kept_words``), then whole, where it breaks an instruction."""
    full = repair(constraints, response, types=settings.types, trim=settings.trim_unfinished)
    if settings.max_kept_words is None:
        return [full]
    short = repair(constraints, response, types=settings.types, trim=settings.trim_unfinished,
                   max_words=settings.max_kept_words)
    return list(dict.fromkeys([short, full]))


def _opens_unasked_quote(rest: Sequence[Constraint], answer: str) -> bool:
    # Opening quotation marks are the form the policy most often puts where nobody asked (half its answers after a
    # round that taught them): a contrast answer must not teach them too.
    return answer.lstrip()[:1] in "\"“" and not any(c.type == "quotation_wrapped" for c in rest)


def contrast(prompt: Prompt, prompt_text: str, response: str, settings: RepairConfig, *, strict: bool = True,
             avoid: NgramIndex | None = None) -> tuple[Constraint, str, str, bool] | None:
    """The other half of a minimal pair for an accepted repair of ``response``: ``prompt_text`` without the first
    instruction of ``settings.contrast_types`` that ``response`` fails (its sentence taken out, so only where the
    text holds the instruction's own wording, as synthesized prompts do), answered with the repair of the other
    instructions alone. The answer must pass those and still fail the removed one (else it shows no contrast);
    without other instructions it is the sampled answer, trimmed as repairs are. ``avoid``: held-out prompts' n-grams
    (a shorter prompt can be one of theirs). Returns (removed instruction, prompt text, answer, whether the answer
    got an ending), or None."""
    for removed in prompt.constraints:
        if removed.type not in (settings.contrast_types or ()) or removed.check(response, strict=strict):
            continue
        wording = f" {removed.describe()}"
        if wording not in prompt_text:
            continue
        text = prompt_text.replace(wording, "", 1)
        if avoid is not None and shares_ngram(text, avoid):
            continue
        rest = [c for c in prompt.constraints if c is not removed]
        if not rest:
            answers = [trim_unfinished(response) if settings.trim_unfinished else response]
        else:
            answers = _repaired(rest, response, settings)
        for answer in answers:
            if not answer.strip() or removed.check(answer, strict=strict) or _opens_unasked_quote(rest, answer):
                continue
            if rest and not verify(rest, answer, strict=strict).passed:
                continue
            ending = any(c.type in ENDING_FIXES and not c.check(response, strict=strict) for c in rest)
            return removed, text, answer, ending
    return None


def repair_samples(prompts: Sequence[Prompt], samples, settings: RepairConfig, *, strict: bool = True,
                   avoid: NgramIndex | None = None, echo_ngram: int | None = None) -> RepairResult:
    """Per prompt, the failed sample whose repair satisfies the most instructions (ties: the smaller edit, then the
    earlier sample) gives one pair (repaired, original), and an SFT row when the repair passes every check.
    One row per prompt, not one per repaired sample: the samples of a prompt repair into near-copies, and
    training on all of them over-weights those prompts (it scored worse on held-out prompts, bench/README.md).
    With ``settings.contrast_types``, an accepted repair also gives its :func:`contrast` row (``avoid``: the
    held-out prompts' n-grams). ``samples``: the judged samples table (``flywheel.feedback.SAMPLE_COLUMNS``); rows
    without a verdict are left out, as everywhere. ``echo_ngram``: a repair that copies its instructions' wording
    (``flywheel.verifiers.echoed_instruction``) is not accepted, as the verifier judge does not accept such a
    sample; its checks count as they are. A contrast answer is not checked again: it is the same sampled answer
    with some of the fixes of the repair that passed the check."""
    import pandas as pd

    from flywheel.refine import REFINE_PAIR_COLUMNS, REFINE_SFT_COLUMNS

    by_id = {p.id: p for p in prompts}
    usable = samples[(samples["verdict"] != "none") & (samples["score"] < 1.0)]
    pairs, sft = [], []
    attempted = improved = contrasted = echoes = 0
    for prompt_id, group in usable.groupby("prompt_id", sort=True):
        prompt = by_id.get(prompt_id)
        if prompt is None:
            raise ValueError(f"judged samples name prompt {prompt_id!r}, which is not among the round's prompts")
        best: tuple | None = None
        for row in group.sort_values("sample_index").itertuples():
            # The shortened repair first; the full one where shortening breaks an instruction (a minimum length).
            variants = _repaired(prompt.constraints, row.response, settings)
            changed = [fixed for fixed in variants if fixed.strip() != row.response.strip()]
            if not changed:
                continue
            attempted += 1
            before = verify(prompt.constraints, row.response, strict=strict)
            for fixed in changed:
                after = verify(prompt.constraints, fixed, strict=strict)
                # A repair must not buy one instruction with another the answer already met.
                if after.score > before.score and not any(b and not a for b, a in zip(before.checks, after.checks)):
                    break
            else:
                continue
            if echo_ngram is not None and echoed_instruction(prompt.constraints, fixed, ngram=echo_ngram):
                echoes += 1
                continue
            improved += 1
            key = (-after.score, abs(len(fixed) - len(row.response)), row.sample_index)
            if best is None or key < best[0]:
                best = (key, row, fixed, before, after)
        if best is None:
            continue
        _, row, fixed, before, after = best
        pairs.append({"row_id": f"{prompt_id}-repair-pair", "prompt_id": prompt_id, "prompt": row.prompt,
                      "chosen": fixed, "rejected": row.response, "chosen_score": after.score,
                      "rejected_score": before.score, "origin": "repair:pair", "judge": "verifier"})
        if after.passed:
            # A passing repair met every instruction, so each ending instruction it failed got its fix appended.
            ending = any(c.type in ENDING_FIXES and not check for c, check in zip(prompt.constraints, before.checks))
            sft.append({"row_id": f"{prompt_id}-repair{row.sample_index}", "prompt_id": prompt_id,
                        "prompt": row.prompt, "completion": fixed, "score": after.score,
                        "origin": "repair:accepted", "judge": "verifier",
                        "ended": bool(getattr(row, "finished", True)) or ending})
            other = contrast(prompt, row.prompt, row.response, settings, strict=strict, avoid=avoid)
            if other is not None:
                removed, text, answer, ending = other
                contrasted += 1
                sft.append({"row_id": f"{prompt_id}-contrast-{removed.type}", "prompt_id": prompt_id,
                            "prompt": text, "completion": answer, "score": 1.0, "origin": "repair:contrast",
                            "judge": "verifier", "ended": bool(getattr(row, "finished", True)) or ending})
    stats = {"attempted": float(attempted), "improved": float(improved), "pairs": float(len(pairs)),
             "passed": float(len(sft) - contrasted)}
    if settings.contrast_types:
        stats["contrast"] = float(contrasted)
    if echo_ngram is not None:
        stats["echoes"] = float(echoes)
    return RepairResult(pairs=pd.DataFrame(pairs, columns=REFINE_PAIR_COLUMNS),
                        sft=pd.DataFrame(sft, columns=REFINE_SFT_COLUMNS), stats=stats)


def augment_rows(prompts: Sequence[Prompt], sft, settings: RepairConfig, *, seed: int, strict: bool = True,
                 avoid: NgramIndex | None = None, echo_ngram: int | None = None) -> RepairResult:
    """Hindsight instructions: an accepted answer (an SFT row that passes every instruction of its prompt) is also
    taught under its prompt with one more instruction of ``settings.augment_types`` (default: ``settings.types``)
    appended, one the answer meets as it is (relabelled) or once its fix is applied (repaired),
    ``settings.augment_per_row`` different ones per row.

    The repair stage teaches an instruction only where a sampled answer failed it, a handful of rows a round for
    most types (all-capitals answers 6-8); every accepted answer can carry any compatible instruction instead. The
    added instruction and its arguments are drawn per row from ``seed`` and the row id (deterministic), the
    result must pass every instruction, and the prompt keeps its id (the row is derived from it) under a new row
    id; ``origin`` says ``augment:relabelled`` or ``augment:repaired``. ``avoid``: the held-out prompts' n-grams;
    an instruction whose prompt would share one is passed over (the quality gate would quarantine the row: the
    held-out prompts are built from the same tasks and instruction texts). ``echo_ngram``: a result that copies
    the wording of one of its instructions (the added one's too) is passed over, as the verifier judge fails such a
    sample. Returns SFT rows only (no pairs)."""
    import random

    import pandas as pd

    from flywheel.refine import REFINE_PAIR_COLUMNS, REFINE_SFT_COLUMNS

    by_id = {p.id: p for p in prompts}
    allowed = list(settings.types or FIXERS)
    addable = list(settings.augment_types or allowed)
    rows, relabelled = [], 0
    accepted = sft[sft["score"] >= 1.0] if len(sft) else sft
    for row in accepted.itertuples():
        prompt = by_id.get(row.prompt_id)
        if prompt is None:
            raise ValueError(f"SFT row {row.row_id!r} names prompt {row.prompt_id!r}, which is not among the round's "
                             "prompts")
        present = [c.type for c in prompt.constraints]
        rng = random.Random(f"augment:{seed}:{row.row_id}")  # a str seed is hashed with SHA-512: stable across runs
        candidates = [name for name in addable if name not in present and compatible([*present, name])]
        rng.shuffle(candidates)
        added = 0
        for name in candidates:
            if added == settings.augment_per_row:
                break
            extra = Constraint(type=name, args=VERIFIERS[name].sample_args(rng))
            text = f"{row.prompt.rstrip()} {extra.describe()}"
            if avoid is not None and shares_ngram(text, avoid):
                continue
            constraints = [*prompt.constraints, extra]
            fixed = repair(constraints, row.completion, types=allowed, trim=settings.trim_unfinished)
            if not verify(constraints, fixed, strict=strict).passed:
                continue
            if echo_ngram is not None and echoed_instruction(constraints, fixed, ngram=echo_ngram):
                continue
            added += 1
            unchanged = fixed == row.completion
            relabelled += unchanged
            ended = bool(getattr(row, "ended", True)) or (not unchanged and name in ENDING_FIXES)
            rows.append({"row_id": f"{row.row_id}-augment-{name}", "prompt_id": row.prompt_id,
                         "prompt": text, "completion": fixed, "score": 1.0,
                         "origin": f"augment:{'relabelled' if unchanged else 'repaired'}", "judge": "verifier",
                         "ended": ended})
    stats = {"augmented": float(len(rows)), "augment_relabelled": float(relabelled),
             "augment_repaired": float(len(rows) - relabelled)}
    return RepairResult(pairs=pd.DataFrame([], columns=REFINE_PAIR_COLUMNS),
                        sft=pd.DataFrame(rows, columns=REFINE_SFT_COLUMNS), stats=stats)


ANCHOR_ORIGIN = "repair:anchor"


def plain_anchor_rows(prompts: Sequence[Prompt], samples, count: int, *, seed: int,
                      avoid: NgramIndex | None = None):
    """Up to ``count`` KL anchor rows (origin :data:`ANCHOR_ORIGIN`): a task of the round asked alone (a
    synthesized prompt's task sentence, without its instructions), with the first judged sample of the first
    prompt that asks it. Training puts no loss on their answers, only the KL term to the starting model
    (``flywheel.training``), so they hold what the policy does with a request that asks for nothing while the
    repairs teach forms where asked. Tasks are drawn by a seeded hash, the same on every attempt. Prompts that ask
    for a language other than English are passed over: their samples do not answer the task asked in English.
    ``avoid``: the held-out prompts' n-grams; a task that shares one is passed over (held-out prompts are built from
    the same tasks, and the quality gate would quarantine the row). Returns an SFT table
    (``flywheel.refine.REFINE_SFT_COLUMNS``)."""
    import pandas as pd

    from flywheel.refine import REFINE_SFT_COLUMNS

    judged = samples[samples["verdict"] != "none"].sort_values(["prompt_id", "sample_index"], kind="stable")
    first = judged.drop_duplicates("prompt_id").set_index("prompt_id")
    by_task: dict[str, Prompt] = {}
    for prompt in sorted(prompts, key=lambda p: p.id):
        task = (prompt.topic or "").strip()
        if (not task or task == prompt.prompt.strip() or prompt.id not in first.index
                or any(c.type == "response_language" and c.args.get("language") != "en"
                       for c in prompt.constraints)
                or (avoid is not None and shares_ngram(task, avoid))):
            continue
        by_task.setdefault(task, prompt)

    rows = []
    for task in sorted(by_task, key=lambda task: unit_hash("anchor", seed, task))[:count]:
        prompt = by_task[task]
        sample = first.loc[prompt.id]
        if not str(sample["response"]).strip():
            continue
        rows.append({"row_id": f"{prompt.id}-anchor", "prompt_id": prompt.id, "prompt": task,
                     "completion": sample["response"], "score": 1.0, "origin": ANCHOR_ORIGIN, "judge": "none",
                     "ended": bool(sample.get("finished", True))})
    return pd.DataFrame(rows, columns=REFINE_SFT_COLUMNS)
