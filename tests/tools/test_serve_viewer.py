"""The routing viewer at / in a real browser (headless Chromium from the system packages, driven by selenium):
type a prompt, generate, see tokens coloured by their top expert, switch an expert off and regenerate. The
screenshot is saved under the test's tmp dir and copied to test-artifacts/ (ignored by git)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deepmoe.data.readers import ChatRenderer
from deepmoe.tools.serve import Engine, create_app
from serving import live_server, tiny_model, tiny_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.cpu_only, pytest.mark.usefixtures("one_thread")]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "no headless Chromium: install the Debian packages chromium and chromium-driver (make test does, as root)"
        )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_viewer_colours_tokens_and_regenerates_with_an_expert_off(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine = Engine(tiny_model(), max_batch=2, eos_token_id=[])
    app = create_app(
        engine, tokenizer=tiny_tokenizer(), chat=ChatRenderer(None, "", "<|endoftext|>"), model_name="tiny"
    )
    driver = _driver()
    try:
        with live_server(app) as url:
            wait = WebDriverWait(driver, 20)
            driver.get(url + "/")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            driver.find_element(By.ID, "prompt").send_keys("the quick brown fox")
            driver.find_element(By.ID, "max-tokens").clear()
            driver.find_element(By.ID, "max-tokens").send_keys("12")
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "tokens").get_attribute("data-run") == "1")
            tokens = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
            assert len(tokens) == 12
            assert all(t.value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)") for t in tokens)
            first = [int(t.get_attribute("data-expert")) for t in tokens]
            counts = [int(c) for c in driver.find_element(By.ID, "load").get_attribute("data-counts").split(",")]
            assert sum(counts) == 12 * engine.model.moe_layers()[engine.moe_layers[0]].config.num_experts_per_tok

            top = max(set(first), key=first.count)  # switch the most used expert off and regenerate
            driver.find_element(By.ID, f"expert-{top}").click()
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "tokens").get_attribute("data-run") == "2")
            assert driver.find_element(By.ID, "error").text == ""
            second = [
                int(t.get_attribute("data-expert")) for t in driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
            ]
            assert top not in second
            assert "without" in driver.find_element(By.ID, "status").text

            shot = tmp_path / "routing-viewer.png"
            assert driver.save_screenshot(str(shot))
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(shot, ARTIFACTS / shot.name)
    finally:
        driver.quit()
