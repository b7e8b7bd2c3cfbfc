"""The web chat in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium): a question
streams its answer in, an uploaded image shows its preview and gets an answer, reset clears the page; a
screenshot is saved (to $GHOSTVIS_TEST_ARTIFACTS when set, else the test's tmp folder).

`make test` installs chromium and chromium-driver with apt-get when they are missing. Where they are missing
and cannot be installed, this test fails naming the fix; GHOSTVIS_SKIP_BROWSER_TEST=1 skips it on purpose.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra: pip install 'ghostvis[serve]'")
from test_serve import home, slow_device, vlm_loaded, vlm_server  # noqa: E402, F401  (fixtures)

SKIP_ENV = "GHOSTVIS_SKIP_BROWSER_TEST"
ARTIFACTS_ENV = "GHOSTVIS_TEST_ARTIFACTS"


def _driver():
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the browser test needs Debian's chromium and chromedriver: `apt-get install chromium "
                    f"chromium-driver` (make test does it as root), or set {SKIP_ENV}=1 to skip it", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs selenium: pip install 'ghostvis[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,720"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(condition, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _ask(driver, text: str) -> tuple[object, list[str]]:
    """Type a question, send it, and watch the answer grow; returns its element and the texts seen."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".assistant"))
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    answer = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant")[before:]
                   or driver.find_elements(By.CSS_SELECTOR, ".error"), "the answer")[0]
    assert "error" not in answer.get_attribute("class"), answer.text
    seen = []
    while True:
        errors = driver.find_elements(By.CSS_SELECTOR, ".error")
        assert not errors, errors[0].text  # the page shows a failed request as an error line
        if answer.get_attribute("data-done") == "1":
            break
        t = answer.text
        if t and (not seen or seen[-1] != t):
            seen.append(t)
        time.sleep(0.005)
    return answer, seen + [answer.text]


def test_web_chat_streams_answers_and_takes_an_image(vlm_server, home, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    from ghostvis_core.data.shapes import draw_example

    server, service = vlm_server
    image = draw_example(tmp_path / "scene.png", image_size=32, upscale=8)
    driver = _driver()
    with slow_device(service, 0.03):  # a slow device, so the page is seen mid-answer
        try:
            driver.get(server.url + "/")
            _wait(lambda: driver.find_element(By.ID, "model").text.startswith("vlm"), "the model name")
            assert "sees images" in driver.find_element(By.ID, "model").text

            answer, seen = _ask(driver, "hello, who are you?")
            print(f"text answer {answer.text!r} seen growing in {len(seen)} steps, {answer.get_attribute('data-chunks')} chunks")
            assert answer.text and len(set(seen)) >= 3  # tokens streamed in: the answer was seen growing
            assert all(answer.text.startswith(s) for s in seen)
            assert "tok/s" in driver.find_element(By.ID, "speed").text

            driver.find_element(By.ID, "reset").click()  # a new conversation: the tiny context holds one turn
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
            driver.find_element(By.ID, "file").send_keys(str(tmp_path / "scene-large.png"))
            _wait(lambda: driver.find_element(By.ID, "preview").is_displayed(), "the image preview")
            n_prompt = service.scheduler.num_finished
            answer, seen = _ask(driver, "What colour is the circle?")
            print(f"image answer {answer.text!r} ({image.qa[0][0]!r} -> {image.qa[0][1]!r} in the scene)")
            assert answer.text and len(set(seen)) >= 2
            assert not driver.find_element(By.ID, "preview").is_displayed()
            assert driver.find_elements(By.CSS_SELECTOR, ".user img")  # the sent image shows in the chat
            assert service.scheduler.num_finished == n_prompt + 1
            out = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path) / "serve-chat.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
            print(f"screenshot: {out}")
            assert out.stat().st_size > 5000
        finally:
            driver.quit()
