"""Prompts and outputs are data: stored byte for byte, shown escaped, never evaluated as templates, code or markup."""

from __future__ import annotations

import html
import json
import re

import pytest

from flywheel.prompts import load_prompts, save_prompts
from flywheel.review import review_markdown
from flywheel.text import escape_markdown, inline_code, table_cell

HOSTILE = [
    "{{ 7*7 }}",
    "{% for x in range(3) %}loop{% endfor %} {{ config.__class__ }} {# comment #}",
    "$(rm -rf /) and `rm -rf /` and ${HOME} and $((6*7))",
    "<script>alert(1)</script><img src=x onerror=alert(2)>",
    "| a | b |\n| --- | --- |\n| 1 | 2 |",
    "[click](javascript:alert(1)) ![img](http://x/y.png) <javascript:alert(3)>",
    "# not a heading\n- not a list\n1. not ordered\n> not a quote\n```\nnot code\n```\n***",
    "0.42 is a ratio\n-5 degrees\n## two\n+ plus\n2) two\n---\n===\n    four spaces",
    "**bold** _em_ ~~gone~~ snake_case a\\b &amp; &lt; 'quotes' \"double\"",
    "unicode: café, 東京, emoji 🦀, RTL \u202e, line\u2028sep, tab\there",
]


def _render(markdown: str) -> str:
    markdown_it = pytest.importorskip("markdown_it")  # CommonMark + GFM tables, as Prefect's UI renders artifacts
    return markdown_it.MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown)


def _visible_text(rendered: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", rendered))


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_renders_as_itself_and_nothing_else(text):
    rendered = _render(escape_markdown(text))
    # Exactly one paragraph of text: no heading, list, quote, code, table, link, image, emphasis or raw HTML.
    tags = set(re.findall(r"</?([a-z0-9]+)", rendered))
    assert tags <= {"p"}, rendered
    # What a reader sees is the text as written (Markdown drops a continuation line's leading spaces, nothing else).
    assert _visible_text(rendered).strip() == "\n".join(line.lstrip() for line in text.split("\n")).strip()


def test_table_cell_stays_in_one_cell():
    row = f"| {table_cell('a | b')} | {table_cell('line one' + chr(10) + '<b>two</b>')} |"
    rendered = _render("| k | v |\n| --- | --- |\n" + row)
    assert rendered.count("<td>") == 2 and "<b>" not in rendered
    assert "a | b" in _visible_text(rendered) and "line one <b>two</b>" in _visible_text(rendered)


def test_inline_code_for_plain_ids_and_escaped_text_otherwise():
    assert inline_code("p00-r0") == "`p00-r0`"
    assert "<" not in inline_code("x`<script>") and "`" not in inline_code("x`<script>").replace("\\`", "")


def test_hostile_prompts_are_stored_byte_for_byte(tmp_path):
    source = tmp_path / "hostile.jsonl"
    rows = [{"id": f"h{i}", "prompt": text, "constraints": [{"type": "all_lowercase", "args": {}}]}
            for i, text in enumerate(HOSTILE)]
    source.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    loaded = load_prompts(source)
    assert [p.prompt.encode("utf-8") for p in loaded] == [text.encode("utf-8") for text in HOSTILE]
    stored = tmp_path / "round" / "prompts.jsonl"  # what a round keeps in its versioned dataset
    save_prompts(loaded, stored)
    assert [p.prompt.encode("utf-8") for p in load_prompts(stored)] == [text.encode("utf-8") for text in HOSTILE]


def test_review_page_shows_hostile_rows_escaped_and_unevaluated():
    sample = [{"row_id": f"h{i}-pair", "prompt_id": f"h{i}", "prompt": text, "chosen": text, "rejected": "ok",
               "chosen_score": 1.0, "rejected_score": 0.0} for i, text in enumerate(HOSTILE)]
    sample.append({"row_id": "evil`<script>", "prompt_id": "e", "prompt": "p", "chosen": "c", "rejected": "r",
                   "chosen_score": 1.0, "rejected_score": 0.0})
    page = review_markdown("round-0001", {"note <script>": "| x |"}, sample, ["chosen", "rejected"])
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "49" not in page  # {{ 7*7 }} was not evaluated anywhere
    assert "{{ 7\\*7 }}" in page and "{% for x in range(3) %}" in page and "$(rm -rf /)" in page
    rendered = _render(page)
    assert "<script" not in rendered and "<img" not in rendered and "<a " not in rendered
    assert "javascript:" not in re.sub(r">[^<]*<", "><", rendered)  # only ever as visible text, never an attribute
    assert "{{ 7*7 }}" in _visible_text(rendered) and "<script>alert(1)</script>" in _visible_text(rendered)
    # The page's own structure survives: its one stats table and one heading per sampled row.
    assert rendered.count("<table>") == 1 and rendered.count("<h3>") == len(sample)


def test_chat_template_treats_the_prompt_as_a_value(tiny_model_dir):
    from flywheel.generation import TransformersEngine, user_request

    engine = TransformersEngine(tiny_model_dir, device="cpu", batch_size=2)
    for text in HOSTILE:
        request = user_request(text)
        rendered = engine.tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True,
                                                        tokenize=False)
        assert text in rendered  # inserted verbatim: not rendered as a template of its own
        if "7*7" in text:
            assert "49" not in rendered
        decoded = engine.tokenizer.decode(engine.encode(request))
        assert text in decoded  # and the tokens the model sees decode back to it
