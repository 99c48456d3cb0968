"""A real browser (Debian's Chromium via Playwright) uploads a sample image and sees the referral, the probabilities
and the heat-map with its legend, on a desktop and on a phone-sized screen; behind a login, a wrong password is
refused and the right one opens the app."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from conftest_app import SAMPLE_IMAGES, models_dir, serving  # noqa: F401

from app.explain import LEGEND_HEIGHT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--no-default-browser-check", "--disable-extensions"]
SAMPLE = SAMPLE_IMAGES / "ISIC_0024307.jpg"
LOGIN_PASSWORD = "correct horse battery"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(models_dir, tmp_path_factory):  # noqa: F811
    with serving(models_dir, tmp_path_factory.mktemp("gradio-browser"), upload_grace_s=0.5) as (demo, url):
        yield url


def test_browser_upload_shows_label_heatmap_and_notice(app_url, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}; install it with `apt-get install -y chromium` "
                    "(make test does this)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(app_url, wait_until="domcontentloaded", timeout=30_000)
            expect(page.locator("#intended-use")).to_contain_text("Not a diagnostic device", timeout=30_000)
            expect(page.locator("#card")).to_contain_text("Classifies into", timeout=10_000)

            page.locator("#upload input[type=file]").set_input_files(str(SAMPLE))

            # The headline is the referral badge; probabilities follow with full names, capped and rounded.
            badge = page.locator("#referral .ll-badge")
            expect(badge).to_contain_text("referral threshold", timeout=30_000)
            assert badge.get_attribute("data-decision") in ("refer", "below")
            probabilities = page.locator("#probabilities")
            expect(probabilities).to_contain_text("melanoma (mel)", timeout=30_000)
            cells = probabilities.locator("td:nth-child(2)").all_inner_texts()
            assert len(cells) == 7 and all(re.fullmatch(r"(> 99|< 1|\d{1,2}) %", c.strip()) for c in cells), cells
            heatmap = page.locator("#heatmap img")
            expect(heatmap).to_be_visible(timeout=30_000)
            page.wait_for_function(
                "() => { const i = document.querySelector('#heatmap img');"
                " return i && i.complete && i.naturalWidth > 0; }",
                timeout=30_000,
            )
            # The model's 64 px input crop, enlarged, with the colour bar underneath; the note names the class.
            assert heatmap.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [320, 320 + LEGEND_HEIGHT]
            expect(page.locator("#heat-note")).to_contain_text("Heat-map for:", timeout=10_000)
            expect(page.locator("#abcd")).to_contain_text("A: asymmetry", timeout=10_000)

            shot = tmp_path / "single_image.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # A bad file gets its message in the page and the outputs are cleared.
            bad = tmp_path / "notes.jpg"
            bad.write_bytes(b"this is not an image")
            page.locator("#upload button[aria-label=Clear]").click()
            expect(page.locator("#heatmap img")).to_have_count(0, timeout=10_000)  # clearing the file clears results
            page.locator("#upload input[type=file]").set_input_files(str(bad))
            expect(page.get_by_text("is not a readable image").first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(tmp_path / "bad_file.png"), full_page=True)
            # Offline and private: the page fetched nothing from any other host (no fonts, CDN or analytics).
            external = [u for u in requested if not u.startswith((app_url, "data:", "blob:"))]
            assert requested and not external, external[:5]

            # A phone (390 x 844): the result comes before the model card.
            phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
            phone.goto(app_url, wait_until="domcontentloaded", timeout=30_000)
            phone.locator("#upload input[type=file]").set_input_files(str(SAMPLE))
            expect(phone.locator("#referral .ll-badge")).to_be_visible(timeout=30_000)
            expect(phone.locator("#abcd")).to_contain_text("A: asymmetry", timeout=30_000)
            result_box = phone.locator("#referral").bounding_box()
            card_box = phone.locator("#card").bounding_box()
            assert result_box["y"] < card_box["y"], (result_box, card_box)
            # The ABCD table keeps whole words (it scrolls sideways instead of breaking them).
            assert phone.locator("#abcd td").first.evaluate("c => getComputedStyle(c).wordBreak") == "normal"
            phone.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def protected_url(models_dir, tmp_path_factory):  # noqa: F811
    from app.auth import add_user

    login_file = tmp_path_factory.mktemp("browser-auth") / "users"
    add_user(login_file, "ward1", LOGIN_PASSWORD)
    with serving(models_dir, tmp_path_factory.mktemp("gradio-browser-auth"), auth_file=str(login_file)) as (demo, url):
        yield url


def test_browser_login_refuses_a_wrong_password_and_admits_the_right_one(protected_url):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}; install it with `apt-get install -y chromium` "
                    "(make test does this)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(protected_url, wait_until="domcontentloaded", timeout=30_000)
            # The login form, with the operator's message; nothing of the app is delivered before a login.
            login = page.get_by_role("button", name="Login")
            expect(login).to_be_visible(timeout=30_000)
            expect(page.get_by_text("sign in with the account your administrator gave you")).to_be_visible()
            expect(page.locator("#upload")).to_have_count(0)

            page.locator("input[type=text]").fill("ward1")
            page.locator("input[type=password]").fill("wrong password!")
            login.click()
            expect(page.get_by_text("Incorrect Credentials")).to_be_visible(timeout=10_000)
            expect(login).to_be_visible()
            expect(page.locator("#upload")).to_have_count(0)

            page.locator("input[type=text]").fill("ward1")  # the form is emptied after a refusal
            page.locator("input[type=password]").fill(LOGIN_PASSWORD)
            login.click()
            expect(page.locator("#upload")).to_be_visible(timeout=30_000)
            expect(page.locator("#referral")).to_be_attached()
            expect(page.locator("#intended-use")).to_contain_text("Not a diagnostic device")
            expect(page.get_by_role("button", name="Login")).to_have_count(0)
        finally:
            browser.close()
