"""The tab's dataset captions panel: caption the training folder automatically, then edit every caption.

Built inside the tab's ``gr.Blocks`` and bound to the training form's dataset folder box. A run goes through
``CaptionRunner`` (a background thread, refused while training runs); the backend says which captioners exist,
builds them, and shows progress on the host's own bar. The grid (filename, caption) is what Save writes back,
atomically, through ``caption.editing``; the bulk actions change the grid only, so they can be checked before
saving. Handlers are methods so tests call them without a browser.
"""

# No ``from __future__ import annotations``: gradio reads handler annotations, as in tab.py.
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import gradio as gr
from PIL import Image

from lora_trainer.data.images import open_image
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui import gradio_compat as compat
from lora_trainer.ui.backend import UiBackend
from lora_trainer.ui.captioning import CaptionBusyError, CaptionRequest, CaptionRunner, progress_line

ELEM = "lora_trainer_caption_"  # elem_id prefix, as the tab's "lora_trainer_"
GRID_HEADERS = ["filename", "caption"]
THUMBNAIL_PX = 160
GALLERY_HEIGHT = 420  # pixels: beside the grid, scrolling when the folder is large
DEFAULT_THRESHOLD = 0.35  # WD14's usual general-tag threshold
POLL_SECONDS = 1.0
POSITIONS = ["start", "end"]

CaptionRows = List[Tuple[str, str]]


def _cell_text(value: Any) -> str:
    """A grid cell as text: gradio may hand back None or NaN for a cell the user emptied."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def grid_rows(table: Any) -> CaptionRows:
    """The grid's (filename, caption) rows; rows without a filename (added by hand) are dropped."""
    rows = []
    for row in compat.table_rows(table):
        cells = [_cell_text(v) for v in list(row) + ["", ""]]
        if cells[0].strip():
            rows.append((cells[0].strip(), cells[1]))
    return rows


def thumbnails(folder: str, rows: CaptionRows) -> List[Tuple[Image.Image, str]]:
    """Small RGB copies of the images (not paths: gradio >= 5 refuses to serve files outside its folders)."""
    images = []
    for name, _caption in rows:
        try:  # as displayed (EXIF orientation, high bit depth), as training and the captioners see it
            images.append((open_image(os.path.join(folder, *name.split("/")), max_side=THUMBNAIL_PX), name))
        except ValueError:  # unreadable: captioning reports it; the grid still lists it
            continue
    return images


class CaptionPanel:
    """The panel's components and handlers, bound to one backend and one caption runner."""

    def __init__(self, backend: UiBackend, runner: CaptionRunner) -> None:
        self.backend = backend
        self.runner = runner

    # --- layout --------------------------------------------------------------------------------------------
    def build(self, dataset: Any, blocks: gr.Blocks) -> None:
        """Lay the panel out in the current gradio context; ``dataset`` is the training form's folder box."""
        self.dataset = dataset
        choices = self.backend.captioner_choices()
        with gr.Accordion(
            "Dataset captions: caption automatically, then review and edit", open=False, elem_id=f"{ELEM}panel"
        ):
            with gr.Row():
                self.captioner = gr.Dropdown(
                    choices=choices, value=choices[0] if choices else None, label="Captioner", elem_id=f"{ELEM}model"
                )
                self.model_path = gr.Textbox(
                    label="Model path",
                    max_lines=1,
                    elem_id=f"{ELEM}model_path",
                    placeholder="blank: the captioner's usual weights (downloaded once, then cached)",
                    info='A local folder or file, or a Hub repo owner/name; required for "local model path".',
                )
                self.threshold = gr.Slider(
                    0.05,
                    0.95,
                    value=DEFAULT_THRESHOLD,
                    step=0.01,
                    label="Tag threshold (taggers)",
                    elem_id=f"{ELEM}threshold",
                )
            with gr.Row():
                self.prefix = gr.Textbox(
                    label="Trigger word before each new caption", max_lines=1, elem_id=f"{ELEM}prefix"
                )
                self.suffix = gr.Textbox(label="... and after it", max_lines=1, elem_id=f"{ELEM}suffix")
                self.overwrite = gr.Checkbox(
                    label="Re-caption images that already have a caption", value=False, elem_id=f"{ELEM}overwrite"
                )
                self.sidecar = gr.Checkbox(
                    label="Also read and write a .txt beside each image", value=False, elem_id=f"{ELEM}sidecar"
                )
            with gr.Row():
                self.run_button = gr.Button("Run captioning", variant="primary", elem_id=f"{ELEM}run")
                self.stop_button = gr.Button("Stop", variant="stop", elem_id=f"{ELEM}stop")
                self.load_button = gr.Button("Load captions", elem_id=f"{ELEM}load")
            self.progress = gr.Textbox(
                label="Captioning",
                value=progress_line(self.runner.status()),
                lines=2,
                interactive=False,
                elem_id=f"{ELEM}progress",
            )
            self.notice = gr.Markdown("", elem_id=f"{ELEM}notice")
            with gr.Row():
                self.grid = gr.Dataframe(
                    label="Captions (edit a cell, then Save)",
                    elem_id=f"{ELEM}grid",
                    value=compat.table_value(GRID_HEADERS, []),
                    scale=3,
                    **compat.editable_table_kwargs(GRID_HEADERS, read_only_columns=[0]),
                )
                self.gallery = gr.Gallery(
                    label="Images",
                    columns=4,
                    height=GALLERY_HEIGHT,
                    object_fit="contain",
                    scale=2,
                    elem_id=f"{ELEM}gallery",
                )
            with gr.Row():
                self.trigger = gr.Textbox(label="Trigger word", max_lines=1, elem_id=f"{ELEM}trigger")
                self.position = gr.Radio(POSITIONS, value="start", label="Add at", elem_id=f"{ELEM}position")
                self.add_button = gr.Button("Add to every caption", elem_id=f"{ELEM}add")
                self.remove_button = gr.Button("Remove from every caption", elem_id=f"{ELEM}remove")
            with gr.Row():
                self.find = gr.Textbox(label="Find", max_lines=1, elem_id=f"{ELEM}find")
                self.replacement = gr.Textbox(label="Replace with", max_lines=1, elem_id=f"{ELEM}replacement")
                self.regex = gr.Checkbox(label="Regular expression", value=False, elem_id=f"{ELEM}regex")
                self.case = gr.Checkbox(label="Match case", value=True, elem_id=f"{ELEM}case")
                self.replace_button = gr.Button("Replace in every caption", elem_id=f"{ELEM}replace")
            self.save_button = gr.Button("Save captions", variant="primary", elem_id=f"{ELEM}save")
            self.grid_folder = gr.State("")  # the folder whose captions the grid holds (Save writes there)
            # The poll never sets the grid: in gradio 3.41 a table whose value came from the repeating poll
            # loses the cell edits made afterwards (seen in a browser). The poll sets this hidden box to a
            # finished run's id instead, and the box's change event fills the grid once.
            self.finished_run = gr.Textbox("", visible=False, elem_id=f"{ELEM}finished_run")
            self.seen = gr.State({})
        self._wire(blocks)

    def _wire(self, blocks: gr.Blocks) -> None:
        self.run_button.click(
            self.start_captioning,
            outputs=[self.notice],
            inputs=[
                self.dataset,
                self.captioner,
                self.model_path,
                self.threshold,
                self.prefix,
                self.suffix,
                self.overwrite,
                self.sidecar,
            ],
        )
        self.stop_button.click(self.stop_captioning, inputs=None, outputs=[self.notice])
        self.load_button.click(
            self.load_captions,
            inputs=[self.dataset, self.sidecar],
            outputs=[self.grid, self.gallery, self.grid_folder, self.notice],
        )
        self.save_button.click(
            self.save_captions, inputs=[self.dataset, self.grid_folder, self.grid, self.sidecar], outputs=[self.notice]
        )
        self.add_button.click(
            self.add_trigger, inputs=[self.grid, self.trigger, self.position], outputs=[self.grid, self.notice]
        )
        self.remove_button.click(
            self.remove_trigger, inputs=[self.grid, self.trigger], outputs=[self.grid, self.notice]
        )
        self.replace_button.click(
            self.find_replace,
            outputs=[self.grid, self.notice],
            inputs=[self.grid, self.find, self.replacement, self.regex, self.case],
        )
        # A folder that already has captions fills the grid as soon as it is entered (no "Load captions").
        for event in (self.dataset.submit, self.dataset.blur):
            event(
                self.load_existing_captions,
                inputs=[self.dataset, self.sidecar, self.grid_folder],
                outputs=[self.grid, self.gallery, self.grid_folder],
            )
        self.finished_run.change(
            self.show_finished_run, inputs=[self.finished_run], outputs=[self.grid, self.gallery, self.grid_folder]
        )
        compat.poll(
            self.poll,
            inputs=[self.seen],
            seconds=POLL_SECONDS,
            blocks=blocks,
            outputs=[self.progress, self.finished_run, self.seen],
        )

    # --- captioning ----------------------------------------------------------------------------------------
    def start_captioning(
        self,
        folder: str,
        choice: str,
        model_path: str,
        threshold: float,
        prefix: str,
        suffix: str,
        overwrite: bool,
        sidecar: bool,
    ) -> str:
        from lora_trainer.caption.registry import CaptionerOptions
        from lora_trainer.caption.run import CaptionRunOptions

        folder = (folder or "").strip()
        if not folder:
            return "**Captioning not started:** enter the dataset folder above."
        if not os.path.isdir(folder):
            return f"**Captioning not started:** the dataset folder `{folder}` does not exist."
        if not choice:
            return "**Captioning not started:** choose a captioner."
        options = CaptionerOptions(
            model_path=(model_path or "").strip() or None,
            threshold=float(threshold if threshold is not None else DEFAULT_THRESHOLD),
            on_download=self.runner.download_progress,
        )
        run_options = CaptionRunOptions(
            prefix=prefix or "", suffix=suffix or "", sidecar=bool(sidecar), overwrite=bool(overwrite)
        )
        request = CaptionRequest(
            folder=folder,
            label=choice,
            options=run_options,
            load=lambda: self.backend.load_captioner(choice, options),
            session=self.backend.caption_session,
        )
        try:
            self.runner.start(request)
        except CaptionBusyError as exc:
            return f"**Captioning not started:** {exc}"
        return f"**Captioning started** with {choice} on `{folder}`; the grid fills in when it ends."

    def stop_captioning(self) -> str:
        if self.runner.stop():
            return "Stopping captioning after the current batch; captions written so far are kept."
        return "Captioning is not running."

    def poll(self, seen: Optional[Dict[str, Any]]) -> List[Any]:
        """The progress line when it changed, and a finished run's id once per page (that fills the grid)."""
        seen = dict(seen or {})
        status = self.runner.status()
        text = progress_line(status)
        progress = compat.no_change() if seen.get("progress") == text else text
        seen["progress"] = text
        finished = compat.no_change()
        if not status.running and status.run_id and seen.get("finished") != status.run_id:
            seen["finished"] = status.run_id
            finished = str(status.run_id)
        return [progress, finished, seen]

    def show_finished_run(self, run_id: str) -> List[Any]:
        """The grid, gallery and grid folder of the finished run ``run_id`` (left alone if another run started)."""
        keep = [compat.no_change()] * 3
        status = self.runner.status()
        if status.running or str(status.run_id) != str(run_id or "") or not os.path.isdir(status.folder):
            return keep
        try:
            return list(self._grid_for(status.folder, status.sidecar))
        except LoraTrainerError:  # a folder that cannot be listed: the progress line says why
            return keep

    # --- the grid ------------------------------------------------------------------------------------------
    @staticmethod
    def _grid_for(folder: str, sidecar: bool) -> Tuple[Any, Any, str]:
        from lora_trainer.caption.editing import load_caption_rows

        rows = load_caption_rows(folder, sidecar=bool(sidecar))
        return compat.table_value(GRID_HEADERS, rows), thumbnails(folder, rows), folder

    def load_captions(self, folder: str, sidecar: bool) -> List[Any]:
        folder = (folder or "").strip()
        try:
            if not folder:
                raise LoraTrainerError("enter the dataset folder above.")
            grid, gallery, loaded = self._grid_for(folder, sidecar)
        except LoraTrainerError as exc:
            return [compat.no_change(), compat.no_change(), compat.no_change(), f"**Not loaded:** {exc}"]
        count = len(compat.table_rows(grid))
        return [grid, gallery, loaded, f"Loaded {count} image(s) from `{loaded}`."]

    def load_existing_captions(self, folder: str, sidecar: bool, grid_folder: str) -> List[Any]:
        """The grid for a newly entered folder that already has captions (metadata.csv, or .txt sidecars when
        "Also read and write a .txt" is ticked); left alone otherwise, and for the folder already shown (its
        unsaved edits stay)."""
        from lora_trainer.data.captions import METADATA_FILENAME

        keep = [compat.no_change()] * 3
        folder = (folder or "").strip()
        if not folder or not os.path.isdir(folder) or os.path.abspath(folder) == os.path.abspath(grid_folder or ""):
            return keep
        try:
            has_sidecars = sidecar and any(name.lower().endswith(".txt") for name in os.listdir(folder))
            if not (os.path.isfile(os.path.join(folder, METADATA_FILENAME)) or has_sidecars):
                return keep
            return list(self._grid_for(folder, sidecar))
        except (OSError, LoraTrainerError):  # unreadable: "Load captions" says why
            return keep

    def save_captions(self, folder: str, grid_folder: str, table: Any, sidecar: bool) -> str:
        from lora_trainer.caption.editing import save_caption_rows

        if self.runner.is_running:
            return "**Not saved:** captioning is running and rewrites metadata.csv when it ends; save after it."
        if not grid_folder:
            return "**Not saved:** load the captions first (Load captions, or run captioning)."
        if (folder or "").strip() and os.path.abspath(folder.strip()) != os.path.abspath(grid_folder):
            return (
                f"**Not saved:** the grid holds the captions of `{grid_folder}`, but the dataset folder is now "
                f"`{folder.strip()}`. Load captions to edit that folder."
            )
        rows = grid_rows(table)
        try:
            path = save_caption_rows(grid_folder, rows, sidecar=bool(sidecar))
        except (LoraTrainerError, OSError) as exc:
            return f"**Not saved:** {exc}"
        where = f"`{path}`" + (" and the .txt sidecars" if sidecar else "")
        return f"Saved {len(rows)} caption(s) to {where}."

    def add_trigger(self, table: Any, word: str, position: str) -> List[Any]:
        from lora_trainer.caption.editing import add_trigger_word

        word = (word or "").strip()
        if not word:
            return [compat.no_change(), "Enter the trigger word to add."]
        rows = add_trigger_word(grid_rows(table), word, position if position in POSITIONS else "start")
        return [compat.table_value(GRID_HEADERS, rows), f"Added `{word}` where it was missing; Save to keep it."]

    def remove_trigger(self, table: Any, word: str) -> List[Any]:
        from lora_trainer.caption.editing import remove_trigger_word

        word = (word or "").strip()
        if not word:
            return [compat.no_change(), "Enter the trigger word to remove."]
        rows = remove_trigger_word(grid_rows(table), word)
        return [compat.table_value(GRID_HEADERS, rows), f"Removed `{word}`; Save to keep it."]

    def find_replace(self, table: Any, find: str, replacement: str, regex: bool, case_sensitive: bool) -> List[Any]:
        from lora_trainer.caption.editing import find_replace

        if not find:
            return [compat.no_change(), "Enter the text to find."]
        before = grid_rows(table)
        try:
            after = find_replace(
                before, find, replacement or "", regex=bool(regex), case_sensitive=bool(case_sensitive)
            )
        except ValueError as exc:
            return [compat.no_change(), f"**Not replaced:** {exc}"]
        changed = sum(1 for old, new in zip(before, after, strict=True) if old != new)
        return [compat.table_value(GRID_HEADERS, after), f"Changed {changed} caption(s); Save to keep them."]
