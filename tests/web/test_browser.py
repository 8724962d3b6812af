"""The page in a real headless Chromium (Debian's ``chromium``, driven by Playwright; `.ci/run`
installs it), against the real stack (`conftest.web_stack`): upload a real photo, see its
category and result cards whose photos loaded, open a listing and its similar listings, search by
text, like listings and see the recommendations change, upload a text file and read the error, a
phone-sized screen, and a dead gateway. Each step is saved as a PNG under ``build/web/``."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from common.config import REPO_ROOT
from scripts.stack import free_port
from tests.gateway.gateway_data import outside_photos
from tests.web.conftest import start_edge

pytestmark = pytest.mark.timeout(900)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-gpu",
]
SHOTS = REPO_ROOT / "build" / "web"
WAIT_MS = 120_000  # a busy 2-core machine embeds a photo in seconds, not milliseconds

LOADED_CARDS = """([selector, count]) => Array.from(document.querySelectorAll(selector + ' .card img'))
    .filter((img) => img.complete && img.naturalWidth > 0).length >= count"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium chromium-driver (.ci/run does)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def new_page(browser, **context):
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    return page, problems


def shot(page, name: str, *, full_page: bool = True) -> None:
    """Save the page once every photo on it has loaded or failed."""
    page.wait_for_function("Array.from(document.images).every((img) => img.complete)")
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def card_ids(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(f"{selector} .card", "cards => cards.map(c => c.dataset.listingId)")


def wait_for_cards(page, selector: str, count: int) -> None:
    page.wait_for_function(LOADED_CARDS, arg=[selector, count])


def test_visual_search_in_a_real_browser(browser, web_stack, tmp_path):
    page, problems = new_page(browser, viewport={"width": 1280, "height": 900})
    page.goto(web_stack.url)
    assert page.title() == "Marketplace visual search"
    page.wait_for_function("document.querySelectorAll('#category option').length > 1")
    assert page.locator("#category option").count() == 14  # "All categories" + the 13
    unlabelled = page.evaluate("""Array.from(document.querySelectorAll('input, select'))
        .filter((e) => !e.labels || e.labels.length === 0).map((e) => e.id)""")
    assert unlabelled == []
    shot(page, "01-page")

    # 1. a real photo of a listing the catalogue does not hold
    photo = outside_photos(web_stack.prepared, 1)[0]
    page.set_input_files("#photo", str(photo))
    page.wait_for_function("document.querySelector('#predicted-category').textContent.includes('%')")
    predicted = page.inner_text("#predicted-category")
    assert predicted.split(" (")[0] in page.eval_on_selector_all(
        "#category option", "options => options.map(o => o.value)"
    )
    assert page.locator("#prediction li").count() == 5
    wait_for_cards(page, "#results", 5)
    results = card_ids(page, "#results")
    assert len(results) == 12 and len(set(results)) == 12
    assert "look like the photo" in page.inner_text("#results-summary")
    first = page.locator("#results .card").first
    assert first.locator(".price").inner_text() and first.locator(".location").inner_text()
    assert first.locator(".score").inner_text().startswith("score ")
    shot(page, "02-photo-results")

    # 2. a listing's details and its similar listings
    title = first.locator(".title").inner_text()
    first.locator(".open").click()
    page.wait_for_selector("#details[open]")
    assert page.inner_text("#details-title") == title
    wait_for_cards(page, "#similar", 3)
    similar = card_ids(page, "#similar")
    assert results[0] not in similar and len(similar) == 8
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#details-photos img'))"
        ".every((img) => img.complete && img.naturalWidth > 0)"
    )
    page.locator("#similar").scroll_into_view_if_needed()
    shot(page, "03-details-and-similar", full_page=False)
    page.click("#close-details")
    page.wait_for_selector("#details:not([open])", state="attached")

    # 3. text search (the photo removed), then photo + text with the text weight
    page.click("#clear-photo")
    page.fill("#query", "sofa")
    page.click("#search-button")
    page.wait_for_function("document.querySelector('#results-summary').textContent.includes('sofa')")
    wait_for_cards(page, "#results", 5)
    text_results = card_ids(page, "#results")
    assert text_results != results
    shot(page, "04-text-search")
    page.set_input_files("#photo", str(photo))
    page.wait_for_function("document.querySelector('#results-summary').textContent.includes('text weight')")
    wait_for_cards(page, "#results", 5)
    shot(page, "05-photo-and-text")

    # 4. like one listing, then another: the recommendations change
    cards = page.locator("#results .card")
    liked_first = cards.nth(0).get_attribute("data-listing-id")
    cards.nth(0).locator(".like").click()
    page.wait_for_selector("#recommendations-panel:not([hidden])")
    wait_for_cards(page, "#recommendations", 5)
    before = card_ids(page, "#recommendations")
    assert liked_first not in before
    assert cards.nth(0).locator(".like").get_attribute("aria-pressed") == "true"
    cards.nth(5).locator(".like").click()
    page.wait_for_function(
        "(before) => { const now = Array.from(document.querySelectorAll("
        "'#recommendations .card')).map(c => c.dataset.listingId);"
        " return now.length > 0 && now.join() !== before.join(); }",
        arg=before,
    )
    wait_for_cards(page, "#recommendations", 5)
    after = card_ids(page, "#recommendations")
    assert after != before and liked_first not in after
    page.locator("#recommendations-heading").scroll_into_view_if_needed()
    shot(page, "06-recommendations")

    # 5. a text file instead of a photo: the gateway's reason, in words
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a photo\n")
    page.set_input_files("#photo", str(notes))
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert message.startswith("This photo could not be used: ") and "image" in message[30:].lower()
    assert page.inner_text("#results-summary") == "The photo could not be searched."
    assert page.locator("#results .card").count() == 0 and page.locator("#preview").is_hidden()
    page.locator("#error").scroll_into_view_if_needed()
    shot(page, "07-text-file-error")
    assert problems == []


def test_the_page_fits_a_phone(browser, web_stack):
    page, problems = new_page(
        browser, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    page.goto(web_stack.url)
    photo = outside_photos(web_stack.prepared, 2)[1]
    # dropped on the drop zone, as a file dragged from another window would be
    page.evaluate(
        """([name, encoded]) => {
        const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
        document.querySelector("#dropzone").dispatchEvent(
            new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }""",
        [photo.name, base64.b64encode(photo.read_bytes()).decode()],
    )
    page.wait_for_function("document.querySelector('#predicted-category').textContent.includes('%')")
    wait_for_cards(page, "#results", 5)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    columns = page.evaluate(
        "getComputedStyle(document.querySelector('#results')).gridTemplateColumns.split(' ').length"
    )
    assert columns == 2
    shot(page, "08-phone")
    assert problems == []


def test_a_dead_gateway_is_explained_on_the_page(browser, web_stack):
    edge = start_edge(web_stack.root, f"127.0.0.1:{free_port()}", web_stack.store, "web-down")
    try:
        page, problems = new_page(browser, viewport={"width": 1000, "height": 700})
        page.goto(f"http://{edge.address}")
        page.wait_for_selector("#status:not([hidden])")
        assert page.locator("#clear-photo").is_hidden()
        assert "not available" in page.inner_text("#status")
        page.fill("#query", "sofa")
        page.click("#search-button")
        page.wait_for_selector("#error:not([hidden])")
        assert "not reachable" in page.inner_text("#error")
        shot(page, "09-gateway-down")
        assert problems == []
    finally:
        edge.stop()
