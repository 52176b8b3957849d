"""The standalone app in a real browser: Debian's chromium driven by Playwright, the app served on 127.0.0.1.

Most tests inject a gated fake trainer through the job runner (the steps, saves and files of a real run,
timed by the test), to check the page: form, Train, live progress and loss plot, refusal, cancel, the
finished list. One test trains a real tiny SD1 checkpoint through the app's standard engine path.
"""

import contextlib
import os
import shutil
import socket
import threading
import time

import pytest
from waiting import CEILING_MS, CEILING_S, wait_until

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): browser tests need it", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")

from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.train.callbacks import StepInfo  # noqa: E402
from lora_trainer.train.result import TrainingResult  # noqa: E402
from lora_trainer.ui.standalone import build_app, launch  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = CEILING_MS  # Playwright's waits are for page states; only a hung page reaches this
STEPS, PAUSE_AT = 20, 8


class GatedTrainer:
    """Runs PAUSE_AT steps, waits for the test to say go (so it can look at a run in progress), then finishes."""

    def __init__(self):
        self.go = threading.Event()

    def __call__(self, cfg, callbacks, **kwargs):
        for cb in callbacks:
            cb.on_train_start(STEPS, 0, {})
        start = time.time()
        for step in range(1, STEPS + 1):
            if step == PAUSE_AT + 1:
                self.go.wait(CEILING_S)
            if step == PAUSE_AT:
                self.write_preview(cfg, callbacks, step)
            time.sleep(0.02)
            info = StepInfo(step, STEPS, 1, 1.0 / step + 0.05 * (step % 3), 1e-4, time.time() - start)
            for cb in callbacks:
                cb.on_step_end(info)
            if any(cb.should_stop() for cb in callbacks):
                return TrainingResult("cancelled", step, [], f"Cancelled at step {step}; nothing saved yet.")
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, f"{cfg.output_name}.safetensors")
        with open(path, "wb") as fh:
            fh.write(b"not really a LoRA")
        for cb in callbacks:
            cb.on_save(path, STEPS)
        return TrainingResult("finished", STEPS, [path], "")

    @staticmethod
    def write_preview(cfg, callbacks, step):
        from PIL import Image

        folder = os.path.join(cfg.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{cfg.output_name}_{step}.png")
        Image.new("RGB", (64, 64), (30, 120, 200)).save(path)
        for cb in callbacks:
            cb.on_preview([path], step)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(root, runner):
    """The standalone app for ``root/loras`` on a free loopback port, closed afterwards."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(str(root / "loras"), runner)
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def open_page(browser, url):
    pg = browser.new_page(viewport={"width": 1280, "height": 1400})
    pg.set_default_timeout(TIMEOUT_MS)
    # Keep the browser on this machine: anything not served by the app (web fonts, CDNs) is refused at once.
    pg.route(
        "**/*", lambda route: route.continue_() if route.request.url.startswith("http://127.0.0.1") else route.abort()
    )
    pg.goto(url)
    pg.locator("#lora_trainer_train").wait_for()
    return pg


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("browser")
    (root / "data").mkdir()
    Image.new("RGB", (32, 32), (30, 120, 200)).save(root / "data" / "a.png")  # the tab checks the folder first
    (root / "model").mkdir()
    trainer = GatedTrainer()
    with serve(root, JobRunner(trainer=trainer)) as url:
        yield url, root, trainer
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def page(served, browser):
    pg = open_page(browser, served[0])
    yield pg
    pg.close()


def field(pg, elem_id):
    return pg.locator(f"#{elem_id}").locator("input, textarea").first


def progress(pg):
    return field(pg, "lora_trainer_progress").input_value()


def wait_progress(pg, *needles):
    def showing():
        text = progress(pg)
        return text if all(n in text for n in needles) else ""

    return wait_until(showing, f"the progress to show {needles}", poll_s=0.1)


def plot_src(pg):
    return pg.locator("#lora_trainer_loss_plot img").first.get_attribute("src")


def fill_form(pg, root, name, base_model=None, steps=STEPS, **options):
    field(pg, "lora_trainer_dataset").fill(str(root / "data"))
    field(pg, "lora_trainer_base_model").fill(base_model or str(root / "model"))
    field(pg, "lora_trainer_output_name").fill(name)
    field(pg, "lora_trainer_opt_max_train_steps").fill(str(steps))
    for key, value in options.items():
        field(pg, f"lora_trainer_opt_{key}").fill(str(value))


def test_train_from_the_page(served, page):
    url, root, trainer = served
    trainer.go.clear()
    assert "Idle" in progress(page)
    empty_plot = plot_src(page)
    fill_form(page, root, "browser_lora")
    page.locator("#lora_trainer_train").click()

    running = wait_progress(page, "Running", f"step {PAUSE_AT}/{STEPS}")
    assert "loss" in running and "it/s" in running and "ETA" in running
    page.locator("#lora_trainer_notice").get_by_text("Train started").wait_for()
    page.wait_for_function("(s) => document.querySelector('#lora_trainer_loss_plot img')?.src !== s", arg=empty_plot)
    mid_plot = plot_src(page)

    page.locator("#lora_trainer_train").click()  # a second Train while one runs is refused with a message
    page.locator("#lora_trainer_notice").get_by_text("already in progress").wait_for()

    trainer.go.set()
    wait_progress(page, "Finished", f"step {STEPS}/{STEPS}")
    page.wait_for_function("(s) => document.querySelector('#lora_trainer_loss_plot img')?.src !== s", arg=mid_plot)
    # gradio's table keeps hidden measuring copies of its cells: read its text rather than a cell's visibility
    page.wait_for_function(
        "() => document.querySelector('#lora_trainer_lora_list')?.textContent.includes('browser_lora.safetensors')"
    )
    page.locator("#lora_trainer_previews img").first.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#lora_trainer_try_it input, #lora_trainer_try_it textarea')?.value"
        " === '<lora:browser_lora:0.8>'"
    )
    assert (root / "loras" / "browser_lora" / "browser_lora.safetensors").is_file()

    field(page, "lora_trainer_try_it").fill("something else")  # selecting a listed LoRA fills "Try it" again
    page.locator("#lora_trainer_lora_list [role=gridcell]").filter(has_text="browser_lora").first.click()
    page.wait_for_function(
        "() => document.querySelector('#lora_trainer_try_it input, #lora_trainer_try_it textarea')?.value"
        " === '<lora:browser_lora:0.8>'"
    )
    if os.environ.get("LORA_TRAINER_SCREENSHOT"):  # for a person to look at the page
        page.screenshot(path=os.environ["LORA_TRAINER_SCREENSHOT"], full_page=True)


def test_cancel_from_the_page(served, page):
    url, root, trainer = served
    trainer.go.clear()
    fill_form(page, root, "cancelled_lora")
    page.locator("#lora_trainer_train").click()
    wait_progress(page, "Running", f"step {PAUSE_AT}/{STEPS}")
    page.locator("#lora_trainer_cancel").click()
    page.locator("#lora_trainer_notice").get_by_text("Cancelling").wait_for()
    trainer.go.set()
    text = wait_progress(page, "Cancelled")
    assert f"step {PAUSE_AT + 1}/{STEPS}" in text  # stopped at the first step after the cancel
    assert not (root / "loras" / "cancelled_lora" / "cancelled_lora.safetensors").exists()


def test_real_tiny_training_from_the_page(tmp_path, browser):
    """The product path end to end: no fake, the standard engine trains a tiny SD1 checkpoint on 4 images."""
    from safetensors import safe_open
    from support.image_fixtures import tiny_checkpoint
    from support.tiny_models import make_image_folder

    make_image_folder(str(tmp_path / "data"), count=4)
    checkpoint = tiny_checkpoint(tmp_path)
    with serve(tmp_path, JobRunner()) as url:
        pg = open_page(browser, url)
        fill_form(pg, tmp_path, "tiny_ui", base_model=checkpoint, steps=6, resolution=64, lora_rank=4)
        pg.locator("#lora_trainer_train").click()
        done = wait_progress(pg, "Finished", "step 6/6")
        assert "loss" in done
        pg.wait_for_function(
            "() => document.querySelector('#lora_trainer_try_it input, #lora_trainer_try_it textarea')?.value"
            " === '<lora:tiny_ui:0.8>'"
        )
        pg.wait_for_function(
            "() => document.querySelector('#lora_trainer_lora_list')?.textContent.includes('tiny_ui.safetensors')"
        )
        assert "pytorch_lora_weights" not in pg.locator("#lora_trainer_lora_list").text_content()
        pg.close()
    lora = tmp_path / "loras" / "tiny_ui" / "tiny_ui.safetensors"
    with safe_open(str(lora), framework="pt") as fh:
        assert fh.metadata()["ss_output_name"] == "tiny_ui"
        assert fh.metadata()["ss_network_dim"] == "4"
        assert any(k.startswith("lora_unet_") for k in fh.keys())


def test_send_to_txt2img_helper_appends_the_prompt(browser):
    """javascript/lora_trainer.js on a page shaped like the WebUI's txt2img prompt box."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "javascript", "lora_trainer.js")
    pg = browser.new_page()
    pg.set_content(
        "<div id='txt2img_prompt'><textarea>a cat</textarea></div>"
        "<script>window.switched = 0; function switch_to_txt2img() { window.switched += 1; }</script>"
    )
    pg.add_script_tag(path=script)
    pg.evaluate("loraTrainerSendToTxt2img('<lora:style:0.8>')")
    assert pg.locator("#txt2img_prompt textarea").input_value() == "a cat <lora:style:0.8>"
    assert pg.evaluate("window.switched") == 1
    pg.close()
