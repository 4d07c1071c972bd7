"""Prompts and model outputs are data: shown to people, never interpreted. These helpers make any text safe to put
into Markdown (the review page, Prefect artifacts), so it is displayed as written and never becomes HTML, a link, a
table cell boundary, a heading or a list.

Text is escaped only where it is rendered; what is stored (prompt files, round data) keeps the exact bytes.
"""

from __future__ import annotations

import re

# HTML first (so the entities we add are not escaped again), then the Markdown characters that act inline.
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_INLINE = set("\\`*[]|~")
# "_" only emphasizes at a word boundary (CommonMark): snake_case names stay readable.
_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# Block markers that act at the start of a line: headings, quotes, list items, rules, setext underlines, fences.
_LINE_START = re.compile(r"^(\s*)(#{1,6}(?=\s|$)|[-+=](?=[\s=+-]|$)|\d{1,9}(?=[.)](?:\s|$)))")


def escape_markdown(text: str) -> str:
    """``text`` as Markdown that renders back to exactly ``text`` (line breaks kept), with no markup of its own."""
    lines = _escape_inline(text).split("\n")
    return "\n".join(_LINE_START.sub(_escape_marker, line) for line in lines)


def _escape_inline(text: str) -> str:
    out = []
    for char in str(text):
        if char in _HTML:
            out.append(_HTML[char])
        elif char in _INLINE:
            out.append("\\" + char)
        else:
            out.append(char)
    return _UNDERSCORE.sub(r"\\_", "".join(out))


def _escape_marker(match: re.Match) -> str:
    indent, marker = match.group(1), match.group(2)
    if marker.isdigit():  # "1. " starts an ordered list; "1\. " does not
        return f"{indent}{marker}\\"
    return f"{indent}\\{marker}"


def table_cell(text: object) -> str:
    """Any value as one Markdown table cell: escaped, pipes neutralized, line breaks as spaces."""
    # Block markers mean nothing inside a cell: only inline markup and the pipe need escaping.
    return " ".join(_escape_inline(str(text)).replace("\r", "").split("\n"))


_PLAIN_ID = re.compile(r"[\w.:@/+-]+")


def inline_code(text: object) -> str:
    """An identifier (a row id, say) as inline code when it is plain, else as escaped text: a code span cannot
    escape a backtick or keep ``<`` out of the page."""
    text = str(text)
    return f"`{text}`" if _PLAIN_ID.fullmatch(text) else escape_markdown(text)
