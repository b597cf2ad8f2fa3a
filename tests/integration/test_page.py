"""The browser page in a real browser: Debian's headless Chromium, driven through its
chromedriver (selenium), draws a stroke on the canvas and sees the prediction, what the model
looked at (occlusion, then Grad-CAM), every layer's feature maps, the first layer's filters and
the parameter table, with nothing fetched from anywhere but the server. The page's REST routes answer what the gRPC API answers.

CNNSERVE_PAGE_MODEL picks the model (default: the trained `fashion`); CNNSERVE_PAGE_SCREENSHOT
names a file to keep the screenshot in (README's is docs/page.png)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness import ServerProcess
from serving.client import Client

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
MODEL = os.environ.get("CNNSERVE_PAGE_MODEL", "fashion")
PAGE_TOKEN = "page-test-token-0123456789"


@pytest.fixture(scope="module")
def rest(trained_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = Path(os.environ.get("CNNSERVE_PAGE_REPOSITORY", trained_repo))
    log = tmp_path_factory.mktemp("page") / "server.log"
    with ServerProcess(repo, http=True, log_path=log) as proc:
        yield proc


def get(url: str, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def array(obj: dict[str, object]) -> np.ndarray:
    data = base64.b64decode(str(obj["base64"]))
    shape = [int(n) for n in obj["shape"]]  # type: ignore[attr-defined]
    return np.frombuffer(data, dtype=np.dtype(str(obj["dtype"]))).reshape(shape)


def test_rest_routes_answer_as_grpc_does(rest: ServerProcess) -> None:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:24, 12:16] = 255  # a "1"
    png = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(png, format="PNG")
    base = f"{rest.http_url}/v1/models/{MODEL}"
    status, _, body = get(f"{base}/feature-maps?top_k=3&layers=pool1,conv1", png.getvalue())
    assert status == 200, body
    answer = json.loads(body)
    with Client(rest.target) as client:
        expected = client.feature_maps(MODEL, png.getvalue(), layers=["conv1", "pool1"], top_k=3)
        filters = client.filters(MODEL)
    assert [m["name"] for m in answer["layers"]] == ["conv1", "pool1"]
    for layer in answer["layers"]:
        assert np.array_equal(array(layer["values"]), expected.maps[layer["name"]])
    assert [(t["label"], t["score"]) for t in answer["top"]] == [
        (label, pytest.approx(score)) for label, score in expected.labels
    ]
    status, _, body = get(f"{base}/filters")
    got = json.loads(body)
    assert status == 200 and got["layer"] == "conv1"
    assert np.array_equal(array(got["kernels"]), filters.kernels)
    assert np.array_equal(array(got["biases"]), filters.biases)
    status, _, body = get(f"{base}/filters?layer=dense1")
    assert status == 400 and "filters come from its convolution layers" in json.loads(body)["error"]
    status, _, body = get(f"{base}/feature-maps?layers=nope", png.getvalue())
    assert status == 400 and "'nope' is not a layer" in json.loads(body)["error"]
    status, _, body = get(f"{base}/feature-maps", b"")
    assert status == 400 and "no image in the request body" in json.loads(body)["error"]
    summary = json.loads(get(f"{base}/summary")[2])
    assert summary["layers"][0]["output_size_formula"] == "(28 - 3 + 2*0)/1 + 1 = 26"
    status, headers, body = get(f"{rest.http_url}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert get(f"{rest.http_url}/page/nothing.js")[0] == 404


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's headless Chromium through its chromedriver, allowed to reach 127.0.0.1 only."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI's container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # nothing but the server: any other host fails to resolve
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@needs_chromium
def test_page_in_chromium_draws_a_stroke_and_shows_every_layer(
    rest: ServerProcess, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(f"{rest.http_url}/?model={MODEL}")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#filters canvas")) == 32)
        rows = driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == [
            "conv1", "pool1", "conv2", "pool2", "conv3", "flatten", "dense1", "output",
        ]  # fmt: skip
        cells = [td.text for td in rows[1].find_elements(By.TAG_NAME, "td")]
        assert cells[3] == "floor((26 - 2)/2) + 1 = 13" and cells[5] == "0 (no weights)"
        assert driver.find_element(By.ID, "prediction").text == ""  # nothing drawn yet

        pad = driver.find_element(By.ID, "pad")  # a "7": the bar, then the stem
        stroke = ActionChains(driver).move_to_element_with_offset(pad, -75, -85).click_and_hold()
        for dx, dy in [(50, 0), (50, 0), (50, 0), (-20, 60), (-20, 60), (-20, 60)]:
            stroke = stroke.move_by_offset(dx, dy)
        stroke.release().perform()

        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps .layer")) == 5)
        wait.until(lambda d: d.find_element(By.ID, "prediction").text != "")
        layers = driver.find_elements(By.CSS_SELECTOR, "#maps .layer")
        assert [(x.get_attribute("data-layer"), len(x.find_elements(By.TAG_NAME, "canvas")))
                for x in layers] == [
            ("conv1", 32), ("pool1", 32), ("conv2", 64), ("pool2", 64), ("conv3", 64),
        ]  # fmt: skip
        assert len(driver.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 5
        # what the model saw is the stroke, not an empty image
        lit = driver.execute_script(
            "const c = document.getElementById('seen').getContext('2d');"
            "return c.getImageData(0, 0, 28, 28).data.filter((v, i) => i % 4 == 0 && v > 128).length;"
        )
        assert lit > 20
        requested = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert requested and all(url.startswith(rest.http_url) for url in requested)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
        if os.environ.get("CNNSERVE_PAGE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["CNNSERVE_PAGE_SCREENSHOT"])


@needs_chromium
def test_page_shows_what_the_model_looked_at_and_switches_method(rest: ServerProcess) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    red = (
        "const c = document.getElementById('heat').getContext('2d');"
        "const d = c.getImageData(0, 0, 28, 28).data; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) if (d[i] > d[i + 2] + 40) n++; return n;"
    )
    with chromium() as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(f"{rest.http_url}/?model={MODEL}")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        pad = driver.find_element(By.ID, "pad")
        stroke = ActionChains(driver).move_to_element_with_offset(pad, -75, -85).click_and_hold()
        for dx, dy in [(50, 0), (50, 0), (50, 0), (-20, 60), (-20, 60), (-20, 60)]:
            stroke = stroke.move_by_offset(dx, dy)
        stroke.release().perform()
        heat = driver.find_element(By.ID, "heat")
        wait.until(lambda d: heat.get_attribute("data-method") == "occlusion")
        best = driver.find_element(By.ID, "prediction").text
        assert heat.get_attribute("data-label") and best.startswith(
            heat.get_attribute("data-label")
        )
        caption = driver.find_element(By.ID, "heat-caption").text
        assert "a 4\u00d74 black patch at 169 positions (stride 2), one batch" in caption
        assert driver.execute_script(red) > 0  # the class's evidence, over the image
        Select(driver.find_element(By.ID, "method")).select_by_value("grad_cam")
        wait.until(lambda d: heat.get_attribute("data-method") == "grad_cam")
        assert "Grad-CAM on conv3" in driver.find_element(By.ID, "heat-caption").text
        assert driver.execute_script(red) > 0
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []


@pytest.fixture(scope="module")
def token_rest(
    trained_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {"CNNSERVE_AUTH_TOKEN": PAGE_TOKEN}
    log = tmp_path_factory.mktemp("page-token") / "server.log"
    with ServerProcess(trained_repo, http=True, env=env, log_path=log) as proc:
        yield proc


@needs_chromium
def test_page_asks_for_the_token_and_sends_it(token_rest: ServerProcess) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(f"{token_rest.http_url}/")  # the page's files are open; its API calls are not
        form = driver.find_element(By.ID, "token-form")
        wait.until(lambda d: form.is_displayed())
        assert "bearer token" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "token").send_keys(PAGE_TOKEN)
        form.submit()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#filters canvas")) == 32)
        assert not form.is_displayed()
        # A new tab's address can carry it in its fragment, which never reaches the server.
        driver.switch_to.new_window("tab")
        driver.get(f"{token_rest.http_url}/#token={PAGE_TOKEN}")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert "#" not in driver.current_url
    assert PAGE_TOKEN not in token_rest.logs()
