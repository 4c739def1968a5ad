"""The chat page and the dashboard in headless Chromium (Debian's, driven by Playwright): a chat
streams, a forced pair shows two answers, a click records a vote the dashboard API then counts.
Screenshots are kept under test-artifacts/ for people to look at."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (scripts/install-test-tools.sh installs it)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    yield pg
    ctx.close()


def votes_counted(url: str, key: str) -> dict[str, int]:
    return httpx.get(url + "/v1/dashboard?hours=1", headers={"Authorization": f"Bearer {key}"},
                     timeout=30).json()["votes_total"]


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    with page.expect_response("**/v1/chat/completions") as resp:
        page.click("#send")
    r = resp.value
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")


def test_chat_streams_and_a_pair_vote_is_recorded(page, duet_server, api_key):
    page.goto(f"{duet_server.url}/#key={api_key}")
    assert page.title() == "Duet chat"
    assert "key=" not in page.url  # the key moved to local storage, out of the address bar

    page.select_option("#pairs", "never")
    send(page, "Say hello.")
    turn = page.locator(".turn.assistant").last
    turn.locator(".version").wait_for()
    assert turn.locator(".answer").count() == 1
    assert turn.locator(".bubble").inner_text().strip()
    assert "model base" in turn.locator(".version").inner_text()
    page.screenshot(path=ARTIFACTS / "chat-single.png")

    before = votes_counted(duet_server.url, api_key).get("a", 0)
    page.select_option("#pairs", "force")
    send(page, "Name a colour.")
    turn = page.locator(".turn.assistant").last
    turn.locator(".votes button").first.wait_for()
    assert turn.locator(".answer").count() == 2
    assert [h.inner_text() for h in turn.locator(".answer h3").all()] == ["Answer A", "Answer B"]
    page.screenshot(path=ARTIFACTS / "chat-pair.png")
    turn.get_by_role("button", name="A is better").click()
    turn.locator(".vote-recorded").wait_for()
    assert "chosen" in (turn.locator(".answer").first.get_attribute("class") or "")
    page.screenshot(path=ARTIFACTS / "chat-voted.png")
    assert votes_counted(duet_server.url, api_key).get("a", 0) == before + 1

    page.goto(f"{duet_server.url}/dashboard")
    page.wait_for_function("document.getElementById('live').textContent !== '–'")
    assert page.locator("#live").inner_text() == "base"
    assert int(page.locator("#votes-total").inner_text()) >= 1
    page.locator("#votes-chart svg").wait_for()
    page.screenshot(path=ARTIFACTS / "dashboard.png", full_page=True)


def test_rank_four_answers_and_edit_one(page, duet_server, api_key):
    page.goto(f"{duet_server.url}/#key={api_key}")
    page.select_option("#pairs", "force")
    page.select_option("#k", "4")
    before = votes_counted(duet_server.url, api_key)
    send(page, "Name a fruit.")
    turn = page.locator(".turn.assistant").last
    turn.locator(".votes button").first.wait_for()
    assert [h.inner_text() for h in turn.locator(".answer h3").all()] == ["Answer A", "Answer B", "Answer C", "Answer D"]
    ranks = turn.locator(".ranking select")
    ranks.nth(3).select_option("1")  # D best, A worst
    ranks.nth(0).select_option("4")
    turn.get_by_role("button", name="Send ranking").click()
    turn.locator(".vote-recorded").wait_for()
    assert "chosen" in (turn.locator(".answer").nth(3).get_attribute("class") or "")

    turn.locator(".answer").nth(1).get_by_role("button", name="Edit").click()
    turn.locator("textarea.edit").fill("A ripe mango.")
    turn.get_by_role("button", name="Send edit").click()
    turn.locator(".edit-recorded").wait_for()
    assert turn.locator(".answer").nth(1).locator(".bubble").inner_text() == "A ripe mango."
    assert turn.get_by_role("button", name="Edit").count() == 0  # one edit per set of answers
    page.screenshot(path=ARTIFACTS / "chat-rank-edit.png")
    after = votes_counted(duet_server.url, api_key)
    assert after.get("ranking", 0) == before.get("ranking", 0) + 1
    assert after.get("edit", 0) == before.get("edit", 0) + 1


def test_a_refused_key_is_explained(page, duet_server):
    page.goto(f"{duet_server.url}/#key=not-a-real-key")
    send_failed = page.fill("#prompt", "hello") or page.click("#send")
    assert send_failed is None
    err = page.locator(".error").first
    err.wait_for()
    assert "API key was refused" in err.inner_text()
    page.screenshot(path=ARTIFACTS / "chat-bad-key.png")
