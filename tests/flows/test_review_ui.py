"""The review gate from the Prefect UI, for real: `prefect server start` on 127.0.0.1, a tiny round with
`review.mode: required` reporting to it, and headless Chromium (Debian's package, driven by Playwright) that opens the
UI, finds the paused run, reads the published sample, fills in the Resume form and submits it.

Run alone with ``-m ui``; a failing step leaves ``ui-failure.png`` (and the page's text) in the test's tmp_path.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from cli import cli_env, flywheel_cmd, run_cli
from helpers import tiny_recipe, write_recipe
from servers import BIN, answers, free_port, quiet_env, stop, wait_until

from flywheel import registry
from flywheel.dataset import read_table

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and quiet on a closed network: without the background-networking flags Chromium keeps dialing out.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_MS = 60_000  # the longest a single UI step may wait for the page (the machine may be busy training)

pytestmark = [
    pytest.mark.ui,
    pytest.mark.server,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                     "(apt-get install -y chromium; .ci/run does)"),
]


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory) -> str:
    """A Prefect server with its own home; the UI is told where its API is. Yields the server's base URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = quiet_env(PREFECT_HOME=str(home), PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                    PREFECT_UI_API_URL=f"{base}/api")
    log = home / "server.log"
    with log.open("w") as handle:
        process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(port), "--analytics-off"], env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answers(f"{base}/api/health"), 240, "prefect server", process, log)
        yield base
    finally:
        stop(process)


def paused_run(workspace: Path, recipe: Path, api: str, process: subprocess.Popen, log: Path) -> tuple[str, str]:
    """Wait until the round is paused for review (as `flywheel review` lists it); its flow run id and name."""
    def listing():
        if process.poll() is not None:
            raise AssertionError(f"round exited {process.returncode} before pausing:\n{log.read_text()[-6000:]}")
        out = run_cli(workspace, "review", "--config", str(recipe), env={"PREFECT_API_URL": api}).stdout
        return re.search(r"^(\S+)\s+(\S+)\s+paused since", out, re.MULTILINE)

    found = wait_until(listing, 900, "round paused for review", log=log, every=3)
    return found.group(1), found.group(2)


def review_in_ui(base: str, run_name: str, shots: Path, *, approve: bool, reviewer: str, notes: str,
                 drop: bool) -> tuple[list[str], str | None]:
    """Find the paused run in the UI, read the sample it published, resume it through the form.

    Returns the row ids the sample page showed and the one dropped (the first shown), if any.
    """
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(shots / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.set_default_timeout(STEP_MS)
        try:
            page.goto(base + "/")  # the UI's home page, as a reviewer would open it
            page.get_by_role("link", name="Runs", exact=True).first.click()
            page.get_by_role("link", name=run_name, exact=True).first.click()
            page.wait_for_url(re.compile(r".*/runs/flow-run/.*"))
            expect(page.get_by_text("Paused", exact=True).first).to_be_visible()
            run_page = page.url

            # The sample the round published for its reviewers: the run's artifacts, its key, its latest version.
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("review-round-0001").first.click()
            page.get_by_role("link", name=re.compile(r"^[0-9a-f]{8}$")).first.click()
            # The key's page renders the latest version too: wait for the version's own page before reading, or
            # the rows are read from a page being torn down.
            page.wait_for_url(re.compile(r".*/artifacts/artifact/.*"))
            expect(page.get_by_role("heading", name="Review round-0001")).to_be_visible()
            expect(page.locator("h3 code").first).to_be_visible()
            shown = [text.strip() for text in page.locator("h3 code").all_inner_texts()]
            assert shown, "the review artifact shows no sampled rows"
            dropped = shown[0] if drop else None
            page.goto(run_page)

            # The run's menu -> Resume: the form Prefect builds from the round's ReviewInput.
            page.get_by_role("button", name="Open menu").first.click()
            page.get_by_role("menuitem", name="Resume").click()
            form = page.get_by_role("dialog")
            approval = form.get_by_role("switch")
            expect(approval).to_have_attribute("aria-checked", "false")  # approval is never the default
            if approve:
                approval.click()
                expect(approval).to_have_attribute("aria-checked", "true")
            form.get_by_label("Reviewer").fill(reviewer)
            form.get_by_label("Notes").fill(notes)
            if dropped:
                form.get_by_role("button", name="Add item").click()
                form.locator("textarea").last.fill(dropped)
            form.get_by_role("button", name="Resume", exact=True).click()
            expect(form).to_be_hidden()
            page.screenshot(path=str(shots / "ui-submitted.png"))
        except Exception:
            page.screenshot(path=str(shots / "ui-failure.png"), full_page=True)
            (shots / "ui-failure.txt").write_text(page.url + "\n" + page.inner_text("body"))
            raise
        finally:
            browser.close()
    return shown, dropped


def run_round_reviewed_in_ui(tiny_model_dir, tmp_path: Path, base: str,
                             **decision) -> tuple[Path, list[str], str | None]:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        # SFT: its table has several rows per prompt, so the sample spans strata and a dropped row leaves data.
        tiny_model_dir, review__mode="required", review__timeout_s=3600, review__sample_size=4,
        training__method="sft"))
    api = f"{base}/api"
    log = tmp_path / "round.log"
    with log.open("w") as handle:
        process = subprocess.Popen(flywheel_cmd("run", "--config", str(recipe)), cwd=workspace,
                                   env={**cli_env(workspace), "PREFECT_API_URL": api}, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _, run_name = paused_run(workspace, recipe, api, process, log)
        shown, dropped = review_in_ui(base, run_name, tmp_path, **decision)
        assert process.wait(timeout=900) == 0, log.read_text()[-6000:]
    finally:
        stop(process)
    return workspace, shown, dropped


def round_record(workspace: Path) -> dict:
    return json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())


def mlflow_uri(workspace: Path) -> str:
    return f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"


def test_approval_in_the_prefect_ui_resumes_the_round(prefect_ui, tiny_model_dir, tmp_path):
    workspace, shown, dropped = run_round_reviewed_in_ui(
        tiny_model_dir, tmp_path, prefect_ui, approve=True, reviewer="carol", notes="spot-checked in the UI",
        drop=True)
    record = round_record(workspace)
    review = record["review"]
    assert record["status"] == "completed" and record["trained"] is not None
    assert review["approved"] is True and review["mode"] == "human" and review["reviewer"] == "carol"
    assert review["notes"] == "spot-checked in the UI" and review["dropped_ids"] == [dropped]
    assert review["sample_ids"] == shown  # the rows the reviewer saw are the ones recorded as seen
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", review["decided_at"])

    data = workspace / "data" / "rounds" / "round-0001"
    quarantine = read_table(data / "quarantine.parquet")
    reasons = set(quarantine.loc[quarantine["row_id"] == dropped, "reasons"])
    assert reasons == {"dropped by reviewer carol: spot-checked in the UI"}
    assert dropped not in set(read_table(data / "sft.parquet")["row_id"])  # not trained on
    assert "decided_at" not in json.loads((data / "review.json").read_text())

    uri = mlflow_uri(workspace)
    tags = registry.client(uri).get_run(record["run_id"]).data.tags
    assert tags["flywheel.review.approved"] == "true" and tags["flywheel.review.reviewer"] == "carol"
    assert tags["flywheel.review.mode"] == "human" and tags["flywheel.review.notes"] == "spot-checked in the UI"
    assert json.loads(tags["flywheel.review.dropped_ids"]) == [dropped]
    assert json.loads(tags["flywheel.review.sample_ids"]) == review["sample_ids"]
    assert tags["flywheel.review.decided_at"] == review["decided_at"]
    assert registry.get_version(uri, "tiny-policy", "2").tags["flywheel.review"] == "approved by carol"


def test_rejection_in_the_prefect_ui_stops_training_and_keeps_the_data(prefect_ui, tiny_model_dir, tmp_path):
    workspace, shown, _ = run_round_reviewed_in_ui(
        tiny_model_dir, tmp_path, prefect_ui, approve=False, reviewer="dave", notes="off-topic answers",
        drop=False)
    record = round_record(workspace)
    assert record["status"] == "rejected"
    assert record["trained"] is None and record["registration"] is None and record["dataset"] is None
    review = record["review"]
    assert review["approved"] is False and review["reviewer"] == "dave" and review["notes"] == "off-topic answers"
    assert review["sample_ids"] == shown

    uri = mlflow_uri(workspace)
    assert [v.version for v in registry.list_versions(uri, "tiny-policy")] == ["1"]  # nothing new registered
    assert not (workspace / ".flywheel" / "models" / "tiny-policy" / "rounds" / "round-0001").exists()
    tags = registry.client(uri).get_run(record["run_id"]).data.tags
    assert tags["flywheel.review.approved"] == "false" and tags["flywheel.review.reviewer"] == "dave"

    data = workspace / "data" / "rounds" / "round-0001"  # the rejected round's data stays for inspection
    for name in ("samples.parquet", "sft.parquet", "quarantine.parquet", "quality.json", "review.json"):
        assert (data / name).is_file(), name
    assert set(review["sample_ids"]) <= set(read_table(data / "sft.parquet")["row_id"])
    assert json.loads((data / "review.json").read_text())["approved"] is False


def test_the_round_plot_renders_on_the_artifact_page(prefect_ui, tmp_path):
    """The plot is an image artifact with the PNG inline (a data: URL): the UI must show it with no file server."""
    from playwright.sync_api import expect, sync_playwright

    from flywheel.plots import data_url, round_plot

    path = round_plot({"all_lowercase": 0.5}, {"all_lowercase": 0.75}, [(1, 0.7), (2, 0.6)], "ui check",
                      tmp_path / "plot.png")
    script = ("from prefect.artifacts import create_image_artifact; import sys; "
              "print(create_image_artifact(sys.argv[1], key='round-plot-ui-check'))")
    created = subprocess.run([str(BIN / "python"), "-c", script, data_url(path)], capture_output=True, text=True,
                             env=quiet_env(PREFECT_API_URL=f"{prefect_ui}/api"), check=True)
    artifact_id = created.stdout.strip().splitlines()[-1]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.set_default_timeout(STEP_MS)
        try:
            page.goto(f"{prefect_ui}/artifacts/artifact/{artifact_id}")
            image = page.locator("img[src^='data:image/png;base64,']").first
            expect(image).to_be_visible()
            assert image.evaluate("img => img.complete && img.naturalWidth") > 1000  # the PNG decoded, 1200 px wide
        except Exception:
            page.screenshot(path=str(tmp_path / "ui-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
