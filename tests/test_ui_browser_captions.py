"""The caption panel in a real browser: caption a generated folder with a tiny WD14 tagger (the standalone app's
"local model path" captioner, nothing faked), edit a caption in the grid, use a bulk action, save, and read
metadata.csv back. Then the same page under the AUTOMATIC1111 pin (gradio 3.41, served from .venv-host when it
exists), whose table loses edits in a case the newer gradio handles."""

import os
import queue
import subprocess
import threading
import time

import pytest
from support.captioners import build_tiny_wd14, write_test_images

# Its module-level checks skip this file too when chromium or playwright is missing.
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, field, open_page, playwright_api, serve
from waiting import CEILING_S, wait_until

from lora_trainer.data.captions import read_metadata_csv
from lora_trainer.jobs import JobRunner

GRID = "#lora_trainer_caption_grid"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_PYTHON = os.path.join(REPO, ".venv-host", "bin", "python")


def read_lines_until(process, text: str) -> bool:
    """Read ``process``'s output until a line holds ``text`` (True) or the output ends (False); a reader
    thread keeps the ceiling for a server that hangs without printing."""
    lines: "queue.Queue" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in process.stdout] + [lines.put(None)], daemon=True).start()
    while (line := lines.get(timeout=CEILING_S)) is not None:
        if text in line:
            return True
    return False


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def grid_has(pg, text):
    """Wait until the grid shows ``text`` (its text, not a cell's visibility: gradio keeps hidden copies)."""
    pg.wait_for_function("([sel, t]) => document.querySelector(sel)?.textContent.includes(t)", arg=[GRID, text])


def wait_caption_progress(pg, needle):
    def showing():
        text = field(pg, "lora_trainer_caption_progress").input_value()
        return text if needle in text else ""

    return wait_until(showing, f"the caption progress to show {needle!r}", poll_s=0.1)


def edit_cell(pg, index, text, cell="[role=gridcell]"):
    """Type ``text`` into the grid's ``index``-th cell (row-major) as a user does: double-click, type, Enter.
    ``cell`` selects the body cells: ``td`` in gradio 3.41."""
    pg.locator(f"{GRID} {cell}").nth(index).dblclick()
    editor = pg.locator(f"{GRID} {cell} textarea, {GRID} {cell} input").first
    editor.fill(text)
    editor.press("Enter")


def test_caption_edit_and_save_from_the_page(tmp_path, browser):
    data = tmp_path / "data"
    write_test_images(str(data), 3)
    tagger = build_tiny_wd14(str(tmp_path / "tagger"))
    with serve(tmp_path, JobRunner()) as url:
        pg = open_page(browser, url)
        pg.locator("#lora_trainer_caption_panel").get_by_text("Dataset captions").first.click()
        field(pg, "lora_trainer_dataset").fill(str(data))  # the training form's folder is the panel's folder
        pg.locator("#lora_trainer_caption_model input").click()
        pg.get_by_role("option", name="local model path").click()
        field(pg, "lora_trainer_caption_model_path").fill(tagger)
        field(pg, "lora_trainer_caption_suffix").fill("mystyle")
        pg.locator("#lora_trainer_caption_run").click()

        done = wait_caption_progress(pg, "Finished")
        assert "3/3 images" in done and "3 captioned" in done and "1girl (3)" in done
        grid_has(pg, "002.png")
        grid_has(pg, "mystyle")
        assert pg.locator("#lora_trainer_caption_gallery img").count() >= 3
        written = read_metadata_csv(str(data / "metadata.csv"))
        assert len(written) == 3 and all(c.endswith(", mystyle") and "1girl" in c for c in written.values())

        edit_cell(pg, 3, 'a hand-written caption, "quoted", café')  # row 001.png, caption column
        grid_has(pg, "a hand-written caption")
        field(pg, "lora_trainer_caption_trigger").fill("tok")
        pg.locator("#lora_trainer_caption_add").click()
        pg.locator("#lora_trainer_caption_notice").get_by_text("Added").wait_for()
        grid_has(pg, "tok, a hand-written caption")
        pg.locator("#lora_trainer_caption_save").click()
        pg.locator("#lora_trainer_caption_notice").get_by_text("Saved 3 caption(s)").wait_for()

        saved = read_metadata_csv(str(data / "metadata.csv"))
        assert saved["001.png"] == 'tok, a hand-written caption, "quoted", café'
        assert saved["000.png"] == "tok, " + written["000.png"]
        if os.environ.get("LORA_TRAINER_SCREENSHOT"):
            pg.screenshot(path=os.environ["LORA_TRAINER_SCREENSHOT"].replace(".png", "_captions.png"), full_page=True)
        pg.close()


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(HOST_PYTHON), reason=".venv-host (tools/setup_host_env.sh host) is missing")
def test_edits_survive_the_polling_under_the_hosts_gradio(tmp_path, browser):
    """In gradio 3.41 a table whose value came from the repeating poll loses later cell edits: the grid must be
    filled after a run by an ordinary event (this failed when the poll filled it)."""
    data = tmp_path / "data"
    write_test_images(str(data), 3)
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen(
        [HOST_PYTHON, os.path.join(REPO, "tests", "serve_caption_panel.py"), str(tmp_path), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        ready = read_lines_until(server, "READY")  # the server's own readiness line
        assert ready and server.poll() is None, "the gradio 3.41 app did not start"
        pg = open_page(browser, f"http://127.0.0.1:{port}/")
        pg.locator("#lora_trainer_caption_panel").get_by_text("Dataset captions").first.click()
        field(pg, "lora_trainer_dataset").fill(str(data))
        field(pg, "lora_trainer_caption_prefix").fill("tok")
        pg.locator("#lora_trainer_caption_run").click()
        wait_caption_progress(pg, "Finished")
        grid_has(pg, "tok, a 48x40 picture")  # filled once the run ended, without a click
        time.sleep(1.5)  # a poll or two go by
        edit_cell(pg, 3, "edited by hand", cell="td")
        time.sleep(1.5)  # ... and more while the edit is in the table
        grid_has(pg, "edited by hand")
        field(pg, "lora_trainer_caption_find").fill("picture")
        field(pg, "lora_trainer_caption_replacement").fill("image")
        pg.locator("#lora_trainer_caption_replace").click()
        grid_has(pg, "tok, a 48x40 image")
        pg.locator("#lora_trainer_caption_save").click()
        pg.locator("#lora_trainer_caption_notice").get_by_text("Saved 3 caption(s)").wait_for()
        assert read_metadata_csv(str(data / "metadata.csv")) == {
            "000.png": "tok, a 48x40 image",
            "001.png": "edited by hand",
            "002.png": "tok, a 48x40 image",
        }
        pg.close()
    finally:
        server.terminate()
        server.wait(CEILING_S)
