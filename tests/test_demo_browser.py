"""The web demo in a real browser: ``kosmos-g demo`` on the micro model, driven by headless
Chromium through Playwright.

Chromium is Debian's (``/usr/bin/chromium``; Playwright's own browser download is never
used). Where it is missing and the tests run as root, the fixture installs it with apt-get;
otherwise the test is skipped and says why. The page's screenshot is saved as a test
artefact (in the test's tmp folder, and copied into ``$KOSMOS_G_TEST_ARTEFACTS`` if set).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web demo needs the 'demo' extra (gradio)")
pytest.importorskip("playwright", reason="the browser test needs playwright (the 'dev' extra)")

from kosmos_g.commands.demo import MICRO_EXAMPLES  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
STARTUP_SECONDS = 120


@pytest.fixture(scope="module")
def chromium() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"no Chromium at {CHROMIUM}, and apt-get can only install it as root "
                    "(run: apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                               "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"apt-get could not install Chromium: {' '.join(done.stderr.split())[-300:]}")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(out: Path, *options: str):
    """``kosmos-g demo OPTIONS`` on a free loopback port, until the generator is closed."""
    port = free_port()
    log = open(out.parent / f"{out.name}-server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kosmos_g.cli", "demo", "--port", str(port), "--output-dir",
                             str(out), *options], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kosmos-g demo exited with {proc.returncode}: "
                                   f"{Path(log.name).read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kosmos-g demo did not start in {STARTUP_SECONDS} s") from None
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.close()


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """The embedded micro model."""
    yield from serve(tmp_path_factory.mktemp("demo-out"))


@pytest.fixture(scope="module")
def tiny_demo_url(tmp_path_factory, tiny_kosmos_dir, tiny_sd_dir):
    """Tiny random models with a ControlNet and a LoRA given on the command line."""
    from kosmos_g.testing import make_tiny_controlnet, make_tiny_lora

    extra = tmp_path_factory.mktemp("tiny-extras")
    cn = make_tiny_controlnet(extra / "canny", tiny_sd_dir)
    lora = make_tiny_lora(extra / "style.safetensors", tiny_sd_dir)
    yield from serve(tmp_path_factory.mktemp("tiny-out"), "--model", str(tiny_kosmos_dir), "--sd", str(tiny_sd_dir),
                     "--controlnet", str(cn), "--lora", str(lora))


@contextlib.contextmanager
def open_page(chromium: str, url: str):
    """A headless Chromium page on ``url``, which must ask no other host; closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
            page.set_default_timeout(30_000)
            elsewhere: list[str] = []
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:"))
                    else elsewhere.append(r.url))
            page.goto(url)
            page.wait_for_selector("#generate")
            yield page
            assert not elsewhere, f"the page asked other hosts: {elsewhere[:5]}"
        finally:
            browser.close()


@pytest.fixture()
def page(chromium, demo_url):
    with open_page(chromium, demo_url) as page:
        yield page


def test_compose_two_images_generate_and_download_a_sidecar(page, tmp_path):
    from playwright.sync_api import expect

    heart, circle = MICRO_EXAMPLES / "pink-checkered-heart.png", MICRO_EXAMPLES / "yellow-checkered-circle.png"
    prompt = "a small <i> on the top and a large <i> on the right, on a pink background"
    page.locator("#prompt textarea").fill(prompt)
    expect(page.locator("#slot-col-2")).to_be_visible()  # one slot per <i> typed
    expect(page.locator("#slot-col-3")).to_be_hidden()
    page.locator("#slot-1 input[type=file]").set_input_files(str(heart))
    page.locator("#slot-2 input[type=file]").set_input_files(str(circle))
    page.wait_for_selector("#slot-2 img")
    expect(page.locator("#preview img")).to_have_count(2)  # how the prompt is read: text, image, text, image
    expect(page.locator("#preview .text").first).to_have_text("a small")

    page.locator("#generate").click()
    expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)
    expect(page.locator("#status")).to_contain_text("2 images")
    links = page.locator('#downloads a[download$=".json"]')
    expect(links).to_have_count(2)
    with page.expect_download() as download:
        links.first.click()
    sidecar = json.loads(Path(download.value.path()).read_text())
    assert sidecar["settings"]["prompt"] == prompt and len(sidecar["settings"]["image_sha256"]) == 2

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("KOSMOS_G_TEST_ARTEFACTS"):
        Path(os.environ["KOSMOS_G_TEST_ARTEFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["KOSMOS_G_TEST_ARTEFACTS"]) / "demo.png")


def test_a_missing_image_is_one_sentence_on_the_page(page):
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill("<i> next to <i>")
    page.locator("#slot-1 input[type=file]").set_input_files(str(MICRO_EXAMPLES / "purple-dotted-star.png"))
    page.wait_for_selector("#slot-1 img")
    page.locator("#generate").click()
    expect(page.get_by_text("The prompt has 2 <i> but 1 image was given; upload an image into slot 2.")
           ).to_be_visible()


def test_an_example_runs_in_one_click_and_an_output_goes_back_into_a_slot(page):
    from playwright.sync_api import expect

    page.locator("#examples").get_by_text("a large <i> on the left, on a green background").click()
    expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)  # no Generate click needed
    expect(page.locator("#prompt textarea")).to_have_value("a large <i> on the left, on a green background")
    page.locator("#use-as-input").click()  # slot 1 is full: a second <i> and slot take the output
    expect(page.locator("#prompt textarea")).to_have_value("a large <i> on the left, on a green background <i>")
    expect(page.locator("#slot-2 img")).to_have_count(1)
    expect(page.locator("#preview img")).to_have_count(2)
    page.locator("#slot-1-remove").click()  # drops the first <i> and its image; the output moves up
    expect(page.locator("#prompt textarea")).to_have_value("a large on the left, on a green background <i>")
    expect(page.locator("#slot-col-2")).to_be_hidden()
    expect(page.locator("#slot-1 img")).to_have_count(1)


def test_the_cancel_button_stops_a_run_and_progress_is_shown(page):
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill("a large red square on the left, on a green background")
    page.locator("#steps input[type=number]").fill("100")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate").click()
    expect(page.locator("#status")).to_contain_text("Sampling: step", timeout=30_000)
    page.locator("#cancel").click()
    expect(page.locator("#status")).to_have_text("Cancelled.", timeout=15_000)
    page.wait_for_timeout(500)
    expect(page.locator("#gallery img")).to_have_count(0)


def test_controlnet_and_lora_panels_with_canny_edges_made_on_the_page(chromium, tiny_demo_url):
    from playwright.sync_api import expect

    from helpers import DOG

    with open_page(chromium, tiny_demo_url) as page:
        page.locator("#prompt textarea").fill("a <i> on grass")
        page.locator("#slot-1 input[type=file]").set_input_files(DOG)
        page.wait_for_selector("#slot-1 img")
        page.get_by_text("ControlNet", exact=True).first.click()  # open the panel
        page.locator("#canny-photo input[type=file]").set_input_files(DOG)
        page.wait_for_selector("#canny-photo img")
        page.locator("#make-canny").click()
        expect(page.locator("#control-image img")).to_have_count(1)
        page.locator("#controlnet input").click()
        page.get_by_role("option", name="canny").click()
        page.get_by_text("LoRA", exact=True).first.click()
        page.locator("#lora input").click()
        page.get_by_role("option", name="style").click()
        page.locator("#steps input[type=number]").fill("4")  # the tiny model's folder asks for 50
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#generate").click()
        expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)
        with page.expect_download() as download:
            page.locator('#downloads a[download$=".json"]').first.click()
        settings = json.loads(Path(download.value.path()).read_text())["settings"]
        assert (settings["controlnet"], settings["lora"], settings["steps"]) == ("canny", "style", 4)
