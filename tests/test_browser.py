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


def test_add_to_home_screen_gets_an_app_with_an_icon(browser, weather, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(weather.url + "/")
    href = page.evaluate("document.querySelector('link[rel=manifest]').href")
    assert href == weather.url + "/manifest.webmanifest"
    manifest = page.evaluate("fetch(document.querySelector('link[rel=manifest]').href).then(r => r.json())")
    assert manifest["name"] == "iotserver" and manifest["short_name"] and manifest["display"] == "standalone"
    assert manifest["start_url"] == "/" and manifest["theme_color"].startswith("#")
    # Chromium's own reading of the manifest: no parse errors, every field understood
    cdp = page.context.new_cdp_session(page)
    read = cdp.send("Page.getAppManifest")
    assert read["url"] == href and read["errors"] == []
    assert read["manifest"]["display"] == "kStandalone" and read["manifest"]["startUrl"] == weather.url + "/"
    # every icon the manifest and the page name decodes as an image of its stated size
    icons = [i["src"] for i in manifest["icons"]] + [
        page.evaluate("document.querySelector('link[rel=%s]').getAttribute('href')" % rel)
        for rel in ("apple-touch-icon", "icon")]
    loaded = page.evaluate("""srcs => Promise.all(srcs.map(src => new Promise(done => {
        const img = new Image(); img.onload = () => done([src, img.naturalWidth, img.naturalHeight]);
        img.onerror = () => done([src, 0, 0]); img.src = src; })))""", icons)
    sizes = {src: (w, h) for src, w, h in loaded}
    assert sizes["/apple-touch-icon.png"] == (180, 180)
    assert sizes["/icon-192.png"] == (192, 192) and sizes["/icon-512.png"] == (512, 512)
    assert sizes["/icon.svg"][0] > 0
    assert page.evaluate("document.querySelector('meta[name=theme-color]').content").startswith("#")
    assert not errors, errors
    page.close()
    # and Chromium would install it (a normal profile: the test's own contexts are incognito)
    context = browser.browser_type.launch_persistent_context(str(tmp_path / "profile"),
                                                             executable_path=need_tool("chromium"), args=FLAGS)
    try:
        page = context.new_page()
        page.goto(weather.url + "/")
        assert context.new_cdp_session(page).send("Page.getInstallabilityErrors")["installabilityErrors"] == []
    finally:
        context.close()


# Where each line of a <code> wraps: the character before the break and what collapsed at it.
_BREAKS = """() => [...document.querySelectorAll("main code")].map(code => {
    const text = code.textContent, chars = [];
    let offset = 0;
    const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    for (let node; (node = walker.nextNode()); offset += node.length) {
        for (let i = 0; i < node.length; i++) {
            const range = document.createRange();
            range.setStart(node, i); range.setEnd(node, i + 1);
            const rect = range.getClientRects()[0];
            if (rect && rect.width > 0) chars.push([offset + i, rect.top]);
        }
    }
    const breaks = [];
    for (let i = 1; i < chars.length; i++) {
        if (chars[i][1] > chars[i - 1][1] + 2) {
            breaks.push([text[chars[i - 1][0]], text.slice(chars[i - 1][0] + 1, chars[i][0])]);
        }
    }
    return [text, breaks];
})"""


@pytest.mark.parametrize("width", [320, 390])
def test_code_on_a_phone_wraps_between_words_and_after_slashes(browser, start, width):
    server = start(*FAST)
    page = browser.new_page(viewport={"width": width, "height": 700})
    page.goto(server.url + "/")  # the empty state: the station URL and the --show-key command
    codes = page.evaluate(_BREAKS)
    url = next(breaks for text, breaks in codes if "/update/" in text)
    assert url and all(before == "/" for before, _ in url), url  # it wraps, after slashes only
    assert server.update("20")[0] == 200
    page.goto(server.url + "/")  # a station without a role: "python3 iotserver.py --role MAC outdoor"
    codes += page.evaluate(_BREAKS)
    assert any("--role" in text for text, _ in codes)
    for text, breaks in codes:
        if "/update/" not in text:
            assert all(" " in collapsed or before == " " for before, collapsed in breaks), (text, breaks)
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    page.close()


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
