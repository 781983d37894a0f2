"""The gateway's web page in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium): log in with a token, see a dataset's progress and its gallery's thumbnails, open one image's
metadata (issue 19, acceptance 3). Screenshots go to the test's folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Farm
from tests.gateway_process import Gateway, running_gateway

pytestmark = pytest.mark.slow

JOB = {"width": 256, "height": 256, "steps": 2, "dataset": "carol-moths"}
PROMPTS = ["a luna moth on birch bark", "a hawk moth at dusk", "a tiger moth, <b>bold</b> & wings"]


@pytest.fixture(scope="module")
def gateway(farm: Farm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(farm.settings, tmp_path_factory.mktemp("page") / "gateway.log") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def carol(gateway: Gateway) -> str:
    token = gateway.token("carol", "--datasets", "carol-*")
    with gateway.client(token) as http:
        sent = http.post("/v1/jobs", json=[{"prompt": prompt, "seed": i, **JOB} for i, prompt in enumerate(PROMPTS)])
        for ref in sent.json()["jobs"]:
            view = http.get(f"/v1/jobs/{ref['job_id']}", params={"dataset": "carol-moths", "wait": 60}).json()
            assert view["state"] == "done", view
    return token


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
    yield driver
    driver.quit()


def test_a_token_holder_logs_in_and_sees_progress_gallery_and_metadata(
    gateway: Gateway, carol: str, browser: WebDriver, tmp_path: Path
) -> None:
    wait = WebDriverWait(browser, 30)
    browser.get(f"{gateway.url}/ui/datasets/carol-moths")
    assert browser.current_url.endswith("/ui/login"), "no cookie: the page asks for a token"
    browser.find_element(By.NAME, "token").send_keys(carol[:-1] + "x")
    browser.find_element(By.ID, "login").click()
    assert (
        "unknown or revoked token"
        in wait.until(expected_conditions.presence_of_element_located((By.CLASS_NAME, "error"))).text
    ), browser.page_source[:2000]
    browser.find_element(By.NAME, "token").send_keys(carol)
    browser.find_element(By.ID, "login").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "datasets")))
    row = browser.find_element(By.LINK_TEXT, "carol-moths").find_element(By.XPATH, "./../..")
    assert "3/3" in row.find_element(By.CLASS_NAME, "done").text
    browser.save_screenshot(str(tmp_path / "datasets.png"))

    row.find_element(By.LINK_TEXT, "carol-moths").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "gallery")))
    assert "3/3 done" in browser.find_element(By.ID, "progress").text
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert len(thumbs) == 3
    wait.until(lambda driver: all(driver.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs))
    assert {t.get_attribute("src").rsplit(".", 1)[1] for t in thumbs} == {"webp"}, "thumbnails, not full PNGs"

    figure = browser.find_elements(By.CSS_SELECTOR, "#gallery figure")[0]
    prompt = figure.find_element(By.CSS_SELECTOR, "dd.prompt")
    assert not prompt.is_displayed()
    figure.find_element(By.TAG_NAME, "summary").click()
    assert prompt.is_displayed() and prompt.text in PROMPTS
    assert figure.find_element(By.CSS_SELECTOR, "dd.level").text == "Q8_0"
    assert not browser.find_elements(By.TAG_NAME, "b"), "a prompt's markup is shown as text, never rendered"
    browser.save_screenshot(str(tmp_path / "gallery.png"))

    browser.find_element(By.LINK_TEXT, "fleet").click()
    assert "Q8_0" in browser.find_element(By.ID, "fleet").text
    browser.get(f"{gateway.url}/ui/datasets/bob-secret")
    assert "may not touch dataset 'bob-secret'" in browser.page_source


def test_the_page_is_served_with_a_strict_policy_and_keeps_the_token_from_scripts(gateway: Gateway, carol: str) -> None:
    logged_in = httpx.post(f"{gateway.url}/ui/login", data={"token": carol}, follow_redirects=False)
    assert logged_in.status_code == 303
    cookie = logged_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    page = httpx.get(f"{gateway.url}/ui/", cookies=logged_in.cookies)
    assert "default-src 'none'" in page.headers["content-security-policy"] and "<script" not in page.text
