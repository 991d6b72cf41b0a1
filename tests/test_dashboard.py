"""The web dashboard in headless Chromium against a real server: upload, verdict, overlay and
boxes, the threshold slider, saving a threshold, and the history page."""

from __future__ import annotations

import httpx
import pytest
from scipy import stats

from .servers import Server

pytestmark = pytest.mark.slow  # browsers, servers and processes: not for the fast lane


@pytest.fixture()
def server(model_dir, tmp_path):
    s = Server(model_dir / "discs.dlens", f"sqlite:///{tmp_path / 'history.db'}", tmp_path / "server.log")
    yield s
    s.stop()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    context.close()
    assert errors == [], errors  # no script error on any page


def badges(page) -> list[str]:
    return page.eval_on_selector_all(".result .verdict", "els => els.map(e => e.textContent)")


def set_slider(page, value: float) -> None:
    page.eval_on_selector("#threshold", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def test_upload_shows_verdict_overlay_and_boxes_and_the_slider_rejudges(server, page, tiny_dataset):
    good = sorted((tiny_dataset / "test" / "good").iterdir())[0]
    scratch = sorted((tiny_dataset / "test" / "scratch").iterdir())[0]
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value=discs]", state="attached")
    page.set_input_files("#files", [str(good), str(scratch)])
    page.wait_for_function("document.querySelectorAll('.result img.overlay').length === 2")
    page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)")

    items = httpx.get(server.url + "/api/history").json()["items"]  # newest first, as the cards are
    assert [r["source"] for r in items] == [scratch.name, good.name]
    assert badges(page) == [r["verdict"] for r in items]
    assert page.eval_on_selector_all(".result", "els => els.map(e => e.querySelectorAll('svg rect').length)") == [len(r["regions"]) for r in items]
    assert page.eval_on_selector(".result img.overlay", "i => i.src.startsWith('data:image/png;base64,')")

    low, high = min(r["score"] for r in items), max(r["score"] for r in items)
    set_slider(page, low - 1e-3)
    assert badges(page) == ["defect", "defect"] and "2 of 2" in page.inner_text("#tally")
    set_slider(page, high + 1e-3)
    assert badges(page) == ["good", "good"] and "0 of 2" in page.inner_text("#tally")
    details = httpx.get(server.url + "/api/models/discs").json()
    n_good = len(details["good_scores"])
    above = sum(v > high + 1e-3 for v in details["good_scores"])
    promise = page.inner_text("#threshold-promise")
    assert f"≤ {100 * (above + 1) / (n_good + 1):.1f} % guaranteed on average" in promise
    upper = 100 * stats.beta.ppf(0.9, above + 1, n_good - above)
    assert f"≤ {upper:.1f} % for this calibration set with 90 % confidence" in promise
    assert details["synthetic_scores"] and f"estimated recall on {len(details['synthetic_scores'])} synthetic defects" in promise
    drawn = page.eval_on_selector("#histogram", "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0)")
    assert drawn
    assert httpx.get(server.url + "/api/history").json()["total"] == 2  # the slider never re-ran the model

    page.fill("#api-key", "wrong")
    page.click("#save-threshold")
    page.wait_for_function("document.getElementById('message').textContent.includes('not changed')")
    page.fill("#api-key", "k")
    page.fill("#reason", "dashboard trial")
    page.click("#save-threshold")
    page.wait_for_function("document.getElementById('message').textContent.includes('is now')")
    threshold = httpx.get(server.url + "/api/models/discs/threshold").json()
    assert threshold["threshold"] == pytest.approx(high + 1e-3, abs=1e-6) and threshold["changes"][-1]["reason"] == "dashboard trial"


def test_drag_and_drop_inspects_the_dropped_file(server, page, tiny_dataset):
    spot = sorted((tiny_dataset / "test" / "spot").iterdir())[0]
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value=discs]", state="attached")
    transfer = page.evaluate_handle("""async ([name, bytes]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
        return dt;
    }""", [spot.name, list(spot.read_bytes())])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector(".result img.overlay")
    assert page.inner_text(".result .name") == spot.name
    assert httpx.get(server.url + "/api/history").json()["items"][0]["source"] == spot.name


def test_history_page_filters_pages_and_charts(server, page, tiny_dataset):
    files = sorted((tiny_dataset / "test").rglob("*.png"))
    for f in files:
        httpx.post(f"{server.url}/api/models/discs/inspect", content=f.read_bytes(), params={"source": f.name})
    verdicts = [r["verdict"] for r in httpx.get(server.url + "/api/history?limit=500").json()["items"]]
    page.goto(server.url + "/history")
    page.wait_for_selector("#rows tbody tr")
    assert page.locator("#rows tbody tr").count() == len(files)
    assert f"of {len(files)}" in page.inner_text("#range")
    assert page.inner_text("#per-model tbody tr td:nth-child(2)") == str(len(files))
    assert page.locator("#trend rect.trend-bar").count() == 1  # one model, one hour

    page.select_option("#f-verdict", "defect")
    page.click("#filters button[type=submit]")
    page.wait_for_function(f"document.querySelectorAll('#rows tbody tr').length === {verdicts.count('defect')}")
    assert set(page.eval_on_selector_all("#rows tbody .verdict", "els => els.map(e => e.textContent)")) == {"defect"}


def test_drift_banner_feedback_buttons_and_role_refusals(model_dir, tmp_path, page, tiny_dataset):
    import shutil

    from .test_line_loop import moved_png

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(model_dir / "discs.dlens", models / "discs.dlens")
    server = Server(models / "discs.dlens", f"sqlite:///{tmp_path / 'history.db'}", tmp_path / "server.log",
                    ("--api-key", "operator:op", "--keep-images", str(tmp_path / "images")))
    try:
        goods = sorted((tiny_dataset / "train" / "good").iterdir())
        for i in range(40):  # the line moved: a brighter lamp on every part
            httpx.post(f"{server.url}/api/models/discs/inspect", content=moved_png(goods[i % len(goods)]), params={"source": f"moved{i}.png"})
        assert httpx.get(server.url + "/api/models/discs/drift").json()["state"] == "drift"

        page.goto(server.url + "/")
        page.wait_for_selector("#drift-banner:not([hidden]) [data-state=drift]")
        assert "discs: drift" in page.inner_text("#drift-banner")
        page.wait_for_function("document.querySelectorAll('#drift-chart circle.drift-point').length === 40")
        assert page.inner_text("#drift-state") == "drift"

        page.fill("#api-key", "op")  # an operator may not change the threshold
        page.click("#save-threshold")
        page.wait_for_function("document.getElementById('message').textContent.includes('not changed')")
        assert "admin role" in page.inner_text("#message")

        page.goto(server.url + "/history")
        page.wait_for_selector("#rows tbody tr")
        page.fill("#api-key", "op")
        row = page.locator("#rows tbody tr", has=page.locator(".verdict.defect")).first
        inspection_id = int(row.get_attribute("data-id"))
        row.locator("button.mark-good").click()
        page.wait_for_function("[...document.querySelectorAll('.feedback-result')].some(e => e.dataset.status === 'learned')", timeout=60_000)
        assert "discs.v2.dlens" in row.locator(".feedback-result").inner_text()
        fb = httpx.get(f"{server.url}/api/history/{inspection_id}/feedback").json()["items"]
        assert fb[0]["label"] == "good" and fb[0]["status"] == "learned"
        page.reload()
        page.wait_for_selector("#audit tbody tr")
        assert {"feedback", "model.learn"} <= set(page.eval_on_selector_all("#audit tbody tr td:nth-child(4)", "els => els.map(e => e.textContent)"))
    finally:
        server.stop()
