"""End to end in a real browser: Playwright drives Debian's Chromium against `sparkvision serve`'s app.

Opens the page, uploads an image and sees a label; submits an ingest job and watches it reach
succeeded; also searches, browses a table, and uploads an image to a detector and sees its boxes.
Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
import uvicorn
from conftest import make_image
from playwright.sync_api import sync_playwright
from test_web_api import root, settings_for, write_training_output  # noqa: F401 - root is a fixture
from test_web_detect import noise_png, write_tiny_detector

from sparkvision.web.app import create_app

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"
    ),
]


server_state: dict = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(spark, root, tmp_path_factory):  # noqa: F811
    """uvicorn on a free loopback port, in a thread, with the runner on the test session's Spark."""
    db = tmp_path_factory.mktemp("browser-db") / "jobs.db"
    app = create_app(
        settings_for(root, db_url=f"sqlite:///{db}", start_runner=True), spark_factory=lambda: spark
    )
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not srv.started:
        assert time.time() - t0 < 60, "uvicorn did not start"
        time.sleep(0.05)
    server_state["app"] = app
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def page(server):
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        pg = browser.new_page(viewport={"width": 1200, "height": 900})
        pg.goto(server)
        yield pg
        browser.close()


def test_classify_by_upload(page, tmp_path):
    img = tmp_path / "query.png"
    img.write_bytes(make_image(2, seed=7))
    page.click("nav button[data-tab=classify]")
    page.set_input_files("#classify-files", str(img))
    label = page.wait_for_selector(".card.result .label", timeout=20_000)
    assert label.inner_text() in ("a", "b", "c", "d")
    assert "ms" in page.inner_text(".latency")
    page.screenshot(path=os.path.join(ARTIFACTS, "classify.png"), full_page=True)


def test_search_and_table_browser(page, tmp_path):
    img = tmp_path / "q.png"
    img.write_bytes(make_image(1, seed=101))
    page.click("nav button[data-tab=search]")
    page.set_input_files("#search-file", str(img))
    page.wait_for_selector("#search-results .cell img", timeout=20_000)
    assert page.locator("#search-results .cell").count() == 8
    page.screenshot(path=os.path.join(ARTIFACTS, "search.png"), full_page=True)
    page.click("nav button[data-tab=tables]")
    page.click("#tables-table tr[data-name='tables/tiny']")
    page.wait_for_selector("#rows-grid .cell img", timeout=20_000)
    assert "of 20" in page.inner_text("#rows-range")
    page.click("#rows-next")
    page.wait_for_function(
        "document.querySelector('#rows-range').innerText.startsWith('21') || "
        "document.querySelector('#rows-range').innerText.startsWith('1–20')"
    )
    page.screenshot(path=os.path.join(ARTIFACTS, "tables.png"), full_page=True)


def test_submit_job_and_watch_it_succeed(page):
    page.click("nav button[data-tab=jobs]")
    page.wait_for_selector("#job-kind option[value=ingest]", state="attached")
    page.select_option("#job-kind", "ingest")
    page.fill("#job-params", json.dumps({"source": "folder", "table": "tables/from_browser"}))
    page.click("#job-submit")
    page.wait_for_selector("#jobs-table tbody tr .state", timeout=10_000)
    page.wait_for_function(
        "[...document.querySelectorAll('#jobs-table tbody tr')].some(tr => tr.innerText.includes('ingest') && "
        "tr.querySelector('.state').innerText === 'succeeded')",
        timeout=120_000,
    )
    page.wait_for_selector("#jd-state:has-text('succeeded')", timeout=10_000)  # the detail pane follows
    page.wait_for_selector("#jd-log:has-text('succeeded')")
    page.screenshot(path=os.path.join(ARTIFACTS, "jobs.png"), full_page=True)


def test_training_curves_and_confusion_matrix(page, server, root):  # noqa: F811
    """A finished training job's row and outputs (the training loop itself is tested in test_train.py)."""
    out = root / "models" / "curves"
    write_training_output(str(out))
    store = server_state["app"].state.sv.store
    job = store.create("train", {"table": str(root / "tables" / "tiny"), "out": str(out)}, str(out))
    store.finish(job.id, "succeeded", progress=100.0, metrics={"test_acc": 0.9})
    page.click("nav button[data-tab=jobs]")
    page.wait_for_selector(f"#jobs-table tr[data-id='{job.id}']", timeout=10_000)
    page.click(f"#jobs-table tr[data-id='{job.id}']")
    page.wait_for_selector("#jd-charts:not([hidden])", timeout=10_000)
    page.wait_for_selector("#jd-confusion table.cm", timeout=10_000)
    assert page.locator("#jd-confusion table.cm tr").count() == 5
    page.screenshot(path=os.path.join(ARTIFACTS, "training.png"), full_page=True)


def test_plan_job_shows_the_choice_and_the_curves(page, server, root):  # noqa: F811
    """A finished plan job's page: its choice and runners-up as a table, measured against predicted,
    the ruled-out reasons and the fitted curves (the plan itself is tested in test_plan.py)."""
    from PIL import Image

    out = root / "plans" / "browser"
    out.mkdir(parents=True)
    option = {"workers": 2, "threads_per_rank": 1, "batch_size": 256, "epochs": 5, "time_s": 80.0}
    plan = {
        "choice": {**option, "accuracy": 0.91, "cost": 160.0},
        "runners_up": [{**option, "batch_size": 512, "accuracy": 0.905, "cost": 170.0}],
        "ruled_out": ["workers=1 threads=1 batch=1024: accuracy 0.85 is below the target 0.9"],
        "cost_unit": "core-seconds",
        "extrapolation": 5.3,
        "warning": "the choice's accuracy is extrapolated 5.3x beyond the profiled learning curves",
        "measured": {"time_s": 83.2, "accuracy": 0.912, "cost": 166.4, "target_met": True},
    }
    (out / "plan.json").write_text(json.dumps(plan))
    Image.new("RGB", (320, 200), "white").save(out / "curves.png")
    store = server_state["app"].state.sv.store
    job = store.create("plan", {"table": str(root / "tables" / "tiny"), "out": str(out)}, str(out))
    store.finish(job.id, "succeeded", progress=100.0, result=plan)
    page.click("nav button[data-tab=jobs]")
    page.wait_for_selector(f"#jobs-table tr[data-id='{job.id}']", timeout=10_000)
    page.click(f"#jobs-table tr[data-id='{job.id}']")
    page.wait_for_selector("#jd-plan:not([hidden]) table.plan", timeout=10_000)
    assert page.locator("#jd-plan table.plan tr").count() == 3  # header, choice, one runner-up
    assert "target met" in page.inner_text("[data-testid=plan-measured]")
    assert "extrapolated 5.3x" in page.inner_text("[data-testid=plan-warning]")
    page.wait_for_function("document.querySelector('[data-testid=plan-curves]').naturalWidth === 320")
    assert "below the target" in page.text_content("#jd-plan details")  # folded: not in inner_text
    page.screenshot(path=os.path.join(ARTIFACTS, "plan.png"), full_page=True)


def test_detect_page_draws_the_boxes_of_an_upload(page, root, tmp_path):  # noqa: F811
    """Random weights score every box just under 0.5: with min score 0 the cap decides the count."""
    write_tiny_detector(root / "detectors" / "browser")
    img = tmp_path / "scene.png"
    img.write_bytes(noise_png(96, 64))
    page.click("nav button[data-tab=detect]")
    page.wait_for_selector("#detect-model option[value='detectors/browser']", state="attached")
    page.select_option("#detect-model", "detectors/browser")
    page.fill("#detect-min-score", "0")
    page.fill("#detect-max", "7")
    with page.expect_response(lambda r: "/api/detect" in r.url) as answer:
        page.set_input_files("#detect-file", str(img))
    body = answer.value.json()
    assert (body["width"], body["height"]) == (96, 64) and len(body["detections"]) == 7
    page.wait_for_function("document.querySelectorAll('#detect-boxes rect').length === 7")
    assert page.locator("#detect-table tbody tr[data-i]").count() == 7
    assert "7 detection(s)" in page.inner_text("#detect-caption")
    # Each box sits where its pixels are on the picture as shown (scaled to the page); the
    # drawn box is its outline's too, 1 px (half the 2 px stroke) wider on each side.
    shown = page.locator("#detect-image").bounding_box()
    scale = shown["width"] / 96
    assert shown["height"] == pytest.approx(64 * scale, abs=1)
    for i, d in enumerate(body["detections"]):
        box = page.locator(f"#detect-boxes g[data-i='{i}'] rect").bounding_box()
        assert box["x"] + 1 == pytest.approx(shown["x"] + d["x1"] * scale, abs=1), (i, d, box)
        assert box["y"] + 1 == pytest.approx(shown["y"] + d["y1"] * scale, abs=1), (i, d, box)
        assert box["width"] - 2 == pytest.approx((d["x2"] - d["x1"]) * scale, abs=1), (i, d, box)
        assert box["height"] - 2 == pytest.approx((d["y2"] - d["y1"]) * scale, abs=1), (i, d, box)
    page.screenshot(path=os.path.join(ARTIFACTS, "detect.png"), full_page=True)
