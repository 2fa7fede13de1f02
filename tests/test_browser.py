"""The page in a real browser: headless Chromium at a phone and a desktop viewport."""

import os
import re

import pytest

from conftest import FAST, MAC, MAC2, ROOT, cli, need_tool

SHOTS = ROOT / "tests" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    chromium = need_tool("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as p:
        # Debian's chromium: playwright must never download a browser of its own
        b = p.chromium.launch(executable_path=chromium, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def weather(start):
    server = start("--refresh", "1", "--tz", "UTC", *FAST)
    assert server.update("20.0", mac=MAC)[0] == 200
    assert server.update("25.0", mac=MAC2)[0] == 200
    assert server.update("1008.5", mac=MAC2, field=2)[0] == 200
    cli(server.db, "--role", MAC, "outdoor")
    cli(server.db, "--role", MAC2, "indoor")
    cli(server.db, "--rename", MAC, "Window")
    cli(server.db, "--rename", MAC2, "Living room")
    return server


@pytest.mark.parametrize("name, viewport", [("phone", {"width": 390, "height": 844}),
                                            ("desktop", {"width": 1280, "height": 900})])
def test_page_shows_advice_and_updates_itself(browser, weather, name, viewport):
    page = browser.new_page(viewport=viewport)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(weather.url + "/")
    headline = page.locator("#headline h1")
    assert headline.is_visible()
    assert headline.inner_text() == "Open the windows — outside is 9.0\u00a0°F cooler"
    window = page.locator('[data-mac="%s"] [data-field="1"]' % MAC)
    assert window.is_visible() and window.inner_text() == "68.0\u00a0°F"
    assert page.locator('[data-mac="%s"] [data-field="2"]' % MAC2).inner_text() == "1008.5\u00a0hPa"
    assert page.title() == "68.0\u00a0°F outside · iotserver"
    chart = page.locator("svg.chart")
    assert chart.is_visible()
    box = chart.bounding_box()
    assert box["width"] <= viewport["width"] and box["height"] > 100
    # nothing wider than the screen (no sideways scrolling on a phone)
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / ("%s-before.png" % name)), full_page=True)

    # outside warms past inside while the page is open: no reload, the advice flips
    assert weather.update("27.5", mac=MAC)[0] == 200
    page.locator("#headline h1", has_text="Keep the windows closed").wait_for(timeout=15000)
    assert window.inner_text() == "81.5\u00a0°F"
    assert page.title().startswith("81.5")
    page.screenshot(path=str(SHOTS / ("%s-after.png" % name)), full_page=True)
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors
    page.close()


def test_page_works_without_javascript(browser, weather):
    context = browser.new_context(java_script_enabled=False, viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(weather.url + "/")
    assert page.locator("#headline h1").inner_text().startswith("Open the windows")
    assert weather.update("27.5", mac=MAC)[0] == 200
    # the <noscript> meta refresh reloads the page by itself
    page.locator("#headline h1", has_text="Keep the windows closed").wait_for(timeout=15000)
    context.close()


def test_dark_mode_follows_the_phone(browser, weather):
    page = browser.new_page(color_scheme="dark", viewport={"width": 390, "height": 844})
    page.goto(weather.url + "/")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert re.fullmatch(r"rgb\((\d+), (\d+), (\d+)\)", background)
    assert sum(map(int, re.findall(r"\d+", background))) < 150  # dark
    page.screenshot(path=str(SHOTS / "phone-dark.png"), full_page=True)
    page.close()
    light = browser.new_page(color_scheme="light")
    light.goto(weather.url + "/")
    assert sum(map(int, re.findall(r"\d+", light.evaluate("getComputedStyle(document.body).backgroundColor")))) > 600
    light.close()


def test_range_links_and_station_pages_work_without_javascript(browser, weather):
    context = browser.new_context(java_script_enabled=False, viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(weather.url + "/")
    assert page.locator(".panel h2").inner_text() == "Last 24 hours"
    for link, title in (("7 d", "Last 7 days"), ("30 d", "Last 30 days"), ("1 y", "Last year"), ("24 h", "Last 24 hours")):
        page.get_by_role("link", name=link, exact=True).click()
        page.wait_for_url("**/?range=%s" % link.replace(" ", ""))
        assert page.locator(".panel h2").inner_text() == title
        assert page.locator("svg.chart").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.get_by_role("link", name="Living room").click()  # a card's name leads to its station's page
    page.wait_for_url("**/station/%s" % MAC2)
    assert page.locator(".panel h2").all_inner_texts() == ["Temperature, last 24 hours", "Pressure, last 24 hours"]
    page.get_by_role("link", name="1 y", exact=True).click()
    page.wait_for_url("**/station/%s?range=1y" % MAC2)
    assert page.locator(".panel h2").all_inner_texts() == ["Temperature, last year", "Pressure, last year"]
    page.screenshot(path=str(SHOTS / "station-phone.png"), full_page=True)
    context.close()


def test_the_open_page_keeps_its_range_when_it_updates(browser, weather):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(weather.url + "/?range=30d")
    assert weather.update("27.5", mac=MAC)[0] == 200
    page.locator("#headline h1", has_text="Keep the windows closed").wait_for(timeout=15000)  # refreshed itself
    assert page.locator(".panel h2").inner_text() == "Last 30 days"
    assert page.url.endswith("/?range=30d")
    page.close()
