"""`causalfusion app` in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium): one sample and two edits through the page's controls, checked on the images the page
shows, and a bad upload that shows its error in the page while the server keeps serving.

Skipped, with the reason, where selenium, gradio or the browser is missing or cannot start.
CAUSALFUSION_APP_SCREENSHOT=PATH also writes the page's screenshot there (docs/images/app.png);
CAUSALFUSION_APP_CKPT=RUN serves that run instead of a tiny one trained here.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from causalfusion import app_core as core

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
GREY = 128  # how the masked input shows the regenerated pixels (editing.GREY as uint8)


def _missing() -> str | None:
    for module, extra in (("selenium", "dev"), ("gradio", "app")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[{extra}]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser test: {_missing()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(out: Path) -> Path:
    """A digits run trained for 4 steps (seconds): the app only needs a real run directory."""
    from causalfusion.ar_plan import ARPlanConfig
    from causalfusion.models import ModelConfig
    from causalfusion.trainer import TrainConfig, Trainer

    model = ModelConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                        num_classes=10, class_tokens=2)
    Trainer(model, ARPlanConfig(), TrainConfig(out=str(out), steps=4, batch_size=16, ckpt_every=4, sample_every=0,
                                               log_every=4, progress=False)).train()
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`causalfusion app` on a free loopback port: yields (url, process); stopped afterwards."""
    tmp = tmp_path_factory.mktemp("app")
    run = os.environ.get("CAUSALFUSION_APP_CKPT") or tiny_run(tmp / "run")
    port = free_port()
    log = open(tmp / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "causalfusion.cli", "app", "--ckpt", str(run), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the app did not answer within 60 s")
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1060", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as e:
        pytest.skip(f"browser test: headless chromium did not start: {str(e.msg or e).splitlines()[0]}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Page:
    """The few things the test does on the page, by the elements' ids (``elem_id`` in app.py)."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.url = driver, url
        self.wait = WebDriverWait(driver, 30, poll_frequency=0.2)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, css)

    def present(self, css: str) -> bool:
        from selenium.webdriver.common.by import By

        return bool(self.d.find_elements(By.CSS_SELECTOR, css))

    def fill(self, elem_id: str, value) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input, #{elem_id} textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)  # TAB: blur, so gradio takes the value

    def choose(self, elem_id: str, label: str) -> None:
        from selenium.webdriver.common.by import By

        self.d.find_element(By.XPATH, f"//*[@id='{elem_id}']//label[normalize-space(.)='{label}']").click()

    def tab(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        self.d.find_element(By.XPATH, f"//button[@role='tab' and normalize-space(.)='{name}']").click()

    def status(self, elem_id: str) -> str:
        return self.find(f"#{elem_id} textarea").get_attribute("value")

    def wait_status(self, elem_id: str, text: str) -> str:
        self.wait.until(lambda _: text in self.status(elem_id), f"{elem_id} never showed {text!r}")
        return self.status(elem_id)

    def new_image(self, elem_id: str, old_src: str | None = None) -> np.ndarray:
        """The picture an image element shows, once its source is not ``old_src``, as uint8 [H, W, 3]."""
        css = f"#{elem_id} img"
        self.wait.until(lambda _: self.present(css) and self.find(css).get_attribute("src") not in (None, "", old_src),
                        f"{elem_id} never showed a new image")
        src = self.find(css).get_attribute("src")
        with urllib.request.urlopen(src, timeout=10) as r:  # what the page shows: the file behind the <img>
            return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")), src


def cells(picture: np.ndarray, count: int, nrow: int, side: int, scale: int) -> list[np.ndarray]:
    """The images of a shown grid back at the model's size, grey [side, side] each."""
    step = side * scale + core.PAD
    out = []
    for i in range(count):
        r, c = divmod(i, nrow)
        block = picture[core.PAD + r * step: core.PAD + r * step + side * scale,
                        core.PAD + c * step: core.PAD + c * step + side * scale, 0]
        out.append(block[scale // 2::scale, scale // 2::scale])
    return out


def test_sample_edit_and_a_bad_upload_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    url, proc = server
    side, scale = 8, core.display_scale(8)
    step = side * scale + core.PAD
    page = Page(browser, url)
    browser.get(url)
    page.wait.until(lambda _: page.present("#sample-btn"), "the page did not load")

    # sample: 4 images of class 3, 2 AR steps of 20 diffusion steps
    page.fill("classes", "3")
    page.fill("n", 4)
    page.fill("ar-steps", 2)
    page.fill("sample-steps", 20)
    page.find("#sample-btn").click()
    grid, _ = page.new_image("sample-grid")
    assert "4 sample(s) of class 3: 2 AR step(s)" in page.wait_status("sample-status", "sample(s)")
    assert grid.shape == (2 * step + core.PAD, 2 * step + core.PAD, 3)
    samples = cells(grid, 4, 2, side, scale)

    # a bad upload: its error is shown in the page, with no traceback
    page.tab("Edit")
    page.wait.until(lambda _: page.present("#use-sample"), "the Edit tab did not open")
    bad = tmp_path / "not-an-image.png"
    bad.write_text("this is text, not a PNG")
    page.find("#upload input[type=file], input[type=file]").send_keys(str(bad))
    message = page.wait_status("edit-status", "Error")
    assert "not-an-image.png is not an image" in message
    assert "Traceback" not in browser.page_source and proc.poll() is None

    # edit sample #2 (the server still serves): the top half regenerated as class 5, 2 variations
    page.fill("sample-index", 2)
    page.find("#use-sample").click()
    page.wait_status("edit-status", "editing sample #2")
    page.choose("mask", "top")
    page.fill("new-class", 5)
    page.fill("variations", 2)
    page.find("#edit-btn").click()
    figure, src = page.new_image("edit-figure")
    assert "2 variation(s) as class 5: 32 pixels regenerated, 32 kept" in page.wait_status("edit-status", "variation")
    assert figure.shape == (step + core.PAD, 4 * step + core.PAD, 3)  # original | masked input | 2 variations
    original, masked, *variations = cells(figure, 4, 4, side, scale)
    assert np.array_equal(original, samples[1])
    assert (masked[:4] == GREY).all() and np.array_equal(masked[4:], original[4:])
    for v in variations:
        assert np.array_equal(v[4:], original[4:])  # kept rows: the source's pixels, exactly
    assert any(not np.array_equal(v[:4], original[:4]) for v in variations)

    # edit with a painted mask: a brush stroke across the top of the image
    page.find("#editor button[aria-label='Brush']").click()
    canvas = browser.find_elements("css selector", "#editor canvas")[-1]
    zoom = float(re.search(r"(\d+)%", page.find("#editor").text).group(1)) / 100  # the editor fits the image
    shown = side * scale * zoom  # the image's side on the screen, centred in the canvas
    x0, y0 = -shown / 2 + 4, -shown / 2 + scale * zoom / 2  # offsets from the canvas centre: model row 0
    ActionChains(browser).move_to_element_with_offset(canvas, int(x0), int(y0)).click_and_hold() \
        .move_by_offset(int(shown / 2), 0).move_by_offset(int(shown / 2) - 8, 0).release().perform()
    page.choose("mask", core.PAINTED)
    time.sleep(0.5)  # the editor sends its layers on change
    page.find("#edit-btn").click()
    figure, _ = page.new_image("edit-figure", src)
    assert "2 variation(s) as class 5" in page.status("edit-status")
    original, masked, *variations = cells(figure, 4, 4, side, scale)
    regenerated = masked == GREY
    assert regenerated[0].all() and not regenerated[-1].any()  # the stroke's rows, not the bottom
    for v in variations:
        assert np.array_equal(v[~regenerated], original[~regenerated])

    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    small = shot.quantize(colors=64, method=Image.Quantize.MEDIANCUT)  # a doc picture of a few tens of kB
    small.save(tmp_path / "app.png", optimize=True)
    if os.environ.get("CAUSALFUSION_APP_SCREENSHOT"):
        small.save(os.environ["CAUSALFUSION_APP_SCREENSHOT"], optimize=True)
    assert proc.poll() is None
