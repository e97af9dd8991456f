"""imgrec studio in a real browser: headless Chromium (Debian's, as tests/test_browser.py)
creates a project, makes classes cat and dog, uploads 30 photos each through the page's file
inputs, trains, watches the progress end, reads the validation accuracy and classifies a
held-out photo; and captures frames from Chromium's fake webcam into a class."""

from __future__ import annotations

import base64
import io
import zipfile

import httpx
import pytest
from servers import serve_in_thread
from test_browser import ARGS, CHELSEA, CHROMIUM

pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                                "(apt-get install chromium chromium-driver; `make test` does)")
WEBCAM = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from imgrec.studio.app import create_app

    root = tmp_path_factory.mktemp("studio")
    with serve_in_thread(None, app=create_app(root)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS + WEBCAM, headless=True)
        yield b
        b.close()


def _new_project(page, studio: str, name: str, classes: list[str]) -> None:
    page.goto(studio + "/studio")
    page.fill("#project-name", name)
    page.click("#create-project")
    page.locator("#project-title", has_text=name).wait_for(timeout=10_000)
    for cls in classes:
        page.fill("#class-name", cls)
        page.click("#add-class")
        page.locator(f".class-card[data-class='{cls}']").wait_for(timeout=10_000)


def test_teach_cats_and_dogs_in_the_browser(studio, browser, cats_dogs, tmp_path):
    from imgrec.predict import Predictor

    page = browser.new_page()
    page.on("dialog", lambda d: d.accept())
    try:
        _new_project(page, studio, "pets", ["cat", "dog"])
        for cls in ("cat", "dog"):
            photos = sorted((cats_dogs / "train" / cls).glob("*.jpg"))[:30]
            card = page.locator(f".class-card[data-class='{cls}']")
            card.locator(".file-input").set_input_files([str(p) for p in photos])
            page.locator(f".class-card[data-class='{cls}'] .count",
                         has_text="(30)").wait_for(timeout=30_000)
        assert page.locator(".class-card[data-class='dog'] .thumbs img").count() == 30
        page.click("#train")
        page.locator("#train-state[data-state='done']").wait_for(timeout=240_000)
        accuracy = float(page.locator("#val-accuracy").inner_text().rstrip("%"))
        assert accuracy >= 95, accuracy
        page.locator("#validation table.confusion").wait_for(timeout=60_000)
        assert page.locator("#validation td.diagonal").count() == 2
        held_out = sorted((cats_dogs / "validation" / "cat").glob("*.jpg"))[0]
        page.set_input_files("#test-file", str(held_out))
        page.locator("#test-results li").first.wait_for(timeout=15_000)
        assert page.locator("#test-results .label").first.inner_text() == "cat"
        assert page.locator("#test-results [role=meter]").count() == 2
        assert "imgrec serve pets-model" in page.locator("#commands").inner_text()
        with page.expect_download() as download:
            page.click("#download")
        unzipped = tmp_path / "unzipped"
        zipfile.ZipFile(io.BytesIO(open(download.value.path(), "rb").read())).extractall(unzipped)
        assert Predictor.load(unzipped).predict([str(held_out)])[0][0].label == "cat"
    finally:
        page.close()


def test_capture_frames_from_the_webcam(studio, browser):
    page = browser.new_page()
    try:
        _new_project(page, studio, "webcam", ["me"])
        page.click("#webcam-toggle")
        page.wait_for_function("document.getElementById('webcam').videoWidth > 0",
                               timeout=15_000)
        button = page.locator(".class-card[data-class='me'] .capture")
        button.hover()
        page.mouse.down()
        page.wait_for_timeout(1200)
        page.mouse.up()
        page.locator(".class-card[data-class='me'] .thumbs img").first.wait_for(timeout=15_000)
        project = httpx.get(f"{studio}/v1/studio/projects/webcam").json()
        count = project["classes"][0]["count"]
        assert count >= 3, count  # five frames a second while held (Chromium's moving test card)
        # a pasted image goes to the class card clicked last
        card = page.locator(".class-card[data-class='me']")
        card.locator("h4").click()
        page.evaluate("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "pasted.jpg", {type: "image/jpeg"}));
            document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt}));
        }""", base64.b64encode(CHELSEA.read_bytes()).decode())
        page.locator(".class-card[data-class='me'] .count",
                     has_text=f"({count + 1})").wait_for(timeout=15_000)
        # a photo clicked (and confirmed) goes to the trash
        page.on("dialog", lambda d: d.accept())
        card.locator(".thumbs img").first.click()
        page.locator(".class-card[data-class='me'] .count",
                     has_text=f"({count})").wait_for(timeout=15_000)
    finally:
        page.close()


def test_a_photo_doctor_flags_is_marked_beside_its_thumbnail(studio, browser, tmp_path):
    """A tiny photo gets imgrec doctor's warning on its thumbnail (outline and tooltip)."""
    from PIL import Image

    Image.new("RGB", (8, 8), (40, 160, 40)).save(tmp_path / "tiny.png")
    page = browser.new_page()
    try:
        _new_project(page, studio, "warned", ["a"])
        page.set_input_files(".class-card[data-class='a'] .file-input", str(tmp_path / "tiny.png"))
        flagged = page.locator(".class-card[data-class='a'] .thumbs img.warn")
        flagged.wait_for(timeout=15_000)
        assert flagged.get_attribute("title").startswith("tiny: 8x8 pixels")
    finally:
        page.close()
