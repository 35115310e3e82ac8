"""The live /status page in a real headless Chromium (Debian's chromium and chromium-driver, driven
by selenium with the system chromedriver: nothing is downloaded). Two turns of one agent: the page
shows the agent, a miss and then a memory hit with cached tokens, and the memory bar moving.

SEMCACHE_SCREENSHOT=path also saves the screenshot there (docs/status.png is made this way)."""

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.test_agents_api import CACHE, convo
from tests.test_status import anthropic_turn

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium is not installed: `make test` installs it as root, else run "
           "`sudo apt-get install chromium chromium-driver`")
WAIT = 20.0  # seconds for the page to show a change (it polls every second)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


async def until(driver, script: str, *args):
    """Poll `script` (a JS expression returning a value) in the page until it is truthy; returns it."""
    from selenium.webdriver.support.ui import WebDriverWait

    def wait():
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(
            lambda d: d.execute_script("return " + script, *args))

    return await asyncio.to_thread(wait)


def js(driver, script: str):
    return asyncio.to_thread(driver.execute_script, "return " + script)


MEMORY_BYTES = "Number(document.getElementById('bar-memory').dataset.bytes || -1)"
BAR_WIDTH = "parseFloat(document.getElementById('bar-memory').style.width || '0')"


async def test_page_shows_a_miss_then_a_memory_hit_and_the_bar_moving(browser, make_client, tmp_path):
    key = "browser-key"
    client = await make_client(api_keys=[key], cache_memory_budget=4000, **CACHE)
    await asyncio.to_thread(browser.get, str(client.make_url("/status")))
    await until(browser, "!document.getElementById('login').hidden")  # no key yet: asked once

    def enter_key():
        browser.find_element("id", "key").send_keys(key)
        browser.find_element("id", "save").click()

    await asyncio.to_thread(enter_key)
    await until(browser, "document.getElementById('login').hidden && document.getElementById('queue').textContent === '0'")
    assert await js(browser, "sessionStorage.getItem('semcache-key')") == key
    assert await js(browser, "location.href") == str(client.make_url("/status"))  # never in the URL
    assert await js(browser, MEMORY_BYTES) == 0 and await js(browser, BAR_WIDTH) == 0

    _, reply = await anthropic_turn(client, convo("What is 2+2?"), "browser-agent", key=key)
    await until(browser, "document.querySelector('#requests li[data-cache=miss]')")
    await until(browser, "document.getElementById('agents').textContent.includes('browser-agent')")
    after_one = await until(browser, MEMORY_BYTES + " > 0 && " + MEMORY_BYTES)
    width_one = await js(browser, BAR_WIDTH)
    assert width_one > 0

    headers, _ = await anthropic_turn(client, convo("What is 2+2?", reply, "And 3+3?"), "browser-agent", key=key)
    cached = int(headers["x-semcache-cached-tokens"])
    hit = await until(browser, "document.querySelector('#requests li[data-cache=memory]')?.textContent")
    assert f"{cached}/" in hit and "browser-agent" in hit
    assert [li for li in await js(browser, "[...document.querySelectorAll('#requests li')].map(li => li.dataset.cache)")] \
        == ["memory", "miss"]
    after_two = await until(browser, MEMORY_BYTES + " > arguments[0] && " + MEMORY_BYTES, after_one)
    assert after_two > after_one and await js(browser, BAR_WIDTH) > width_one  # turn 2's longer entry

    shot = tmp_path / "status.png"
    assert await asyncio.to_thread(browser.save_screenshot, str(shot))
    assert shot.stat().st_size > 1000
    if os.environ.get("SEMCACHE_SCREENSHOT"):
        shutil.copy(shot, Path(os.environ["SEMCACHE_SCREENSHOT"]))


async def test_phone_width_has_no_sideways_scroll(browser, make_client):
    client = await make_client(**CACHE)
    await anthropic_turn(client, convo("Hello there"), "narrow-agent")
    browser.set_window_size(390, 844)
    await asyncio.to_thread(browser.get, str(client.make_url("/status")))
    await until(browser, "document.getElementById('agents').textContent.includes('narrow-agent')")
    assert await js(browser, "window.innerWidth") <= 400  # really a phone's width
    overflow = await js(browser, "document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
