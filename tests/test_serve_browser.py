"""``vitkit serve`` in a real headless browser (the system's Chromium through Selenium and chromedriver): load the
page, upload a real MNIST digit, wait for the prediction, click a pixel, check that the attention overlay is
painted; then a file that is not an image gets a message on the page. Saves a screenshot.

Installs nothing: skips, saying what is missing, without Chromium, chromedriver or Selenium (``.ci/run``
installs them: the Debian packages chromium and chromium-driver, and ``pip install -e '.[serve]'``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from serve_helpers import need_serve_extra, tiny_mnist_run

need_serve_extra()

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip(
        "no headless browser: needs Chromium and chromedriver on PATH "
        "(Debian: apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
if importlib.util.find_spec("selenium") is None:
    pytest.skip("Selenium is not installed (it comes with: pip install -e '.[serve]')", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from vitkit.serve import Explorer, create_app, start_in_thread  # noqa: E402
from vitkit.train import load_run, predict  # noqa: E402


def chromium(width: int = 1200, height: int = 720) -> webdriver.Chrome:
    """Headless Chromium from the system packages (``--no-sandbox``: CI runs as root)."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions",
                f"--window-size={width},{height}"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_upload_a_digit_predict_and_click_for_attention(tmp_path_factory, tmp_path):
    run_dir = tiny_mnist_run(tmp_path_factory.getbasetemp())
    explorer = Explorer.load(str(run_dir))
    digit = tmp_path / "digit.png"
    explorer.held_out[11][0].save(digit)  # a real held-out MNIST digit, 28x28
    expected = predict(load_run(run_dir), [str(digit)])[0]["top"]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a PNG at all\n")

    url, stop = start_in_thread(create_app(explorer))
    driver = chromium()
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(url)
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        driver.find_element(By.ID, "file").send_keys(str(digit))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#predictions li")) == len(expected))
        rows = [li.text.split() for li in driver.find_elements(By.CSS_SELECTOR, "#predictions li")]
        assert [r[0] for r in rows] == [t["class"] for t in expected]  # the page shows what `vitkit predict` says
        assert [float(r[-1]) for r in rows] == pytest.approx([t["prob"] for t in expected], abs=6e-4)

        view = driver.find_element(By.ID, "view")
        before = driver.execute_script("return arguments[0].toDataURL()", view)
        assert view.get_attribute("data-overlay") == ""
        # click input pixel (y, x) = (6, 25): 384 / 32 = 12 screen pixels per input pixel; offsets from the centre
        ActionChains(driver).move_to_element_with_offset(view, 25 * 12 + 6 - 192, 6 * 12 + 6 - 192).click().perform()
        wait.until(lambda d: view.get_attribute("data-overlay") == "attention")
        assert driver.execute_script("return arguments[0].toDataURL()", view) != before  # something was painted
        assert "pixel (6, 25)" in driver.find_element(By.ID, "message").text
        # level 0 of this NesT attends only inside the query's 16x16-pixel block (the top-right one): painted there,
        # the image untouched (grey) elsewhere
        assert driver.execute_script("return document.getElementById('layer').value") == "1"  # the last layer first
        driver.execute_script(
            "const l = document.getElementById('layer'); l.value = 0; l.dispatchEvent(new Event('input'))"
        )
        wait.until(lambda d: "levels.0" in d.find_element(By.ID, "message").text)
        inside, outside = driver.execute_script(
            """const c = arguments[0].getContext('2d');
               const px = (x, y) => Array.from(c.getImageData(x * 12 + 6, y * 12 + 6, 1, 1).data);
               return [px(20, 4), px(4, 20)];""",
            view,
        )
        assert outside[0] == outside[1] == outside[2] and not inside[0] == inside[1] == inside[2], (inside, outside)
        shot = Path(os.environ.get("VITKIT_SCREENSHOTS", tmp_path)) / "serve_browser_test.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0

        driver.find_element(By.ID, "file").send_keys(str(not_an_image))
        wait.until(lambda d: d.find_element(By.ID, "message").get_attribute("class") == "error")
        assert "not an image" in driver.find_element(By.ID, "message").text
    finally:
        driver.quit()
        stop()
