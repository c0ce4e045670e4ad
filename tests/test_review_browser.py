"""The review page in a real headless Chromium (Debian `chromium`, `make system-deps`; driven by Playwright
from PyPI with that browser, no browser download): rate three items by keyboard, reload, resume, export."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.review_helpers import QUESTIONS, ReviewServer, make_run

CHROMIUM = os.environ.get("OLLAMA_FT_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture()
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs the Debian chromium package at {CHROMIUM} (`make system-deps`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs playwright (`make install`: the dev extra)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _progress(page) -> str:
    return page.inner_text("#progress-text")


def _wait_text(page, selector: str, ok, timeout: float = 15.0) -> str:
    """Poll an element's text from Python (the page's CSP forbids the eval that wait_for_function uses)."""
    deadline = time.monotonic() + timeout
    while True:
        text = page.inner_text(selector) if page.query_selector(selector) else ""
        if ok(text) or time.monotonic() > deadline:
            assert ok(text), f"{selector}: {text!r}"
            return text
        time.sleep(0.05)


def _selected(page) -> list[str]:
    """The score boxes shown as chosen, as 'A relevance=4' strings."""
    return page.evaluate("""() => [...document.querySelectorAll('.rows .row')].flatMap(r => {
        const on = r.querySelector('.box.on'); const side = r.closest('section').id.slice(-1).toUpperCase();
        return on ? [side + ' ' + r.querySelector('.name').textContent.toLowerCase() + '=' + on.textContent] : [];
    })""")


def test_rate_by_keyboard_reload_resume_export(tmp_path, browser):
    run = make_run(tmp_path / "runs")
    srv = ReviewServer(str(run), "--reviewer", "alice")
    try:
        origin = srv.base
        ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        foreign: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(origin) else foreign.append(r.url))

        page.goto(srv.base + "/")  # without the token: refused
        assert "wrong token" in page.inner_text("body")
        page.goto(srv.url)
        _wait_text(page, "#progress-text", lambda t: t.startswith("Item 1 of"))
        assert _progress(page) == f"Item 1 of {len(QUESTIONS)} · rated 0 of {len(QUESTIONS)}"
        body = page.inner_text("body")
        assert "base" not in body.lower() and "tuned" not in body.lower()  # blind: no side is named
        assert "Keys:" in body and "prefer A / B / tie" in body

        typed = {}
        for n, keys in enumerate(["453232", "544455", "222333"]):
            for k in keys:
                page.keyboard.press(k)
            typed[n] = _selected(page)
            assert len(typed[n]) == 6
            page.keyboard.press(["a", "b", "t"][n])  # preference: saves and moves to the next item
            _wait_text(page, "#progress-text", lambda t, n=n: t.endswith(f"rated {n + 1} of 6"))
        assert _progress(page).startswith("Item 4 of 6")
        page.keyboard.press("4")
        page.keyboard.press("4")  # a partial rating of item 4
        _wait_text(page, "#save", lambda t: t.startswith("saved"))
        shot = tmp_path / "review-page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("OLLAMA_FT_REVIEW_SCREENSHOT"):  # for the developer to look at
            shutil.copy(shot, os.environ["OLLAMA_FT_REVIEW_SCREENSHOT"])

        page.reload()  # resume: the first unfinished item, with its partial scores and the same A/B order
        _wait_text(page, "#progress-text", lambda t: t.startswith("Item"))
        assert _progress(page) == "Item 4 of 6 · rated 3 of 6"
        assert _selected(page) == ["A relevance=4", "A fluency=4"]
        page.keyboard.press("p")
        assert _progress(page).startswith("Item 3 of 6") and _selected(page) == typed[2]
        page.keyboard.press("ArrowLeft")
        assert _selected(page) == typed[1]

        with page.expect_download() as dl:
            page.keyboard.press("e")
        rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text(encoding="utf-8"))))
        assert [r["complete"] for r in rows] == ["yes", "yes", "yes", "no"]
        assert [r["preference"] for r in rows[:3]] == ["A", "B", "tie"]
        assert rows[0]["A_relevance"] == "4" and rows[0]["B_professionalism"] == "2"
        assert foreign == []  # nothing outside the review server was requested (works offline)

        srv.kill()  # kill -9 mid-session, then a new server (new port, new token): the ratings are there
        page.keyboard.press("5")  # a change while the server is down is reported, not lost silently
        _wait_text(page, "#save", lambda t: t.startswith("NOT saved"))
        srv = ReviewServer(str(run), "--reviewer", "alice")
        origin = srv.base
        page.goto(srv.url)
        _wait_text(page, "#progress-text", lambda t: t.startswith("Item"))
        assert _progress(page) == "Item 4 of 6 · rated 3 of 6"
        ctx.close()
    finally:
        srv.stop()
    saved = json.loads((run / "review" / "base-vs-tuned" / "alice.json").read_text())
    assert sum(1 for r in saved["items"].values() if r["preference"]) == 3
