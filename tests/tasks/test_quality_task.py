"""Tests for tasks/quality.py: the Markdown summary the quality-gate task publishes as a Prefect artifact.
(Named apart from tests/flywheel/test_quality.py: test modules share one namespace.)"""

from __future__ import annotations

import pandas as pd

from flywheel.config import QualityConfig
from flywheel.quality import run_quality_gate
from tasks.quality import summary_markdown


def test_summary_names_the_stopping_share_and_links_the_docs(tmp_path) -> None:
    rows = [{"row_id": f"s{i}", "prompt_id": f"p{i}", "prompt": "Say hi.", "sample_index": 0,
             "response": "hi there", "n_tokens": 2, "finished": i > 2, "score": 1.0, "passed": True}
            for i in range(10)]
    out = run_quality_gate(tmp_path / "great_expectations", {"samples": pd.DataFrame(rows)}, eval_prompts=[],
                           settings=QualityConfig(max_truncated_share=0.2), docs_dir=tmp_path / "docs")
    text = summary_markdown("round-0003", out.report, str(tmp_path / "quarantine.parquet"))
    assert text.startswith("# Quality gate of round-0003: FAILED")
    assert "| samples.response_truncated | 30.0% |" in text
    assert "**stopped**: samples: share of responses truncated at the token limit 30.0% exceeds " \
           "quality.max_truncated_share 20.0%" in text
    assert f"({(tmp_path / 'docs' / 'index.html').resolve().as_uri()})" in text
