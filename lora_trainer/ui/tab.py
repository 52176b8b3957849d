"""The trainer tab: one gradio code path for gradio 3.41 (AUTOMATIC1111), 4.40 (Forge) and 6.x (standalone).

``build_tab(backend, runner)`` returns a ``gr.Blocks`` that the WebUI mounts as a tab and the standalone app
launches. Handlers are methods of ``TrainerTab`` so tests can call them without a browser. Version
differences go through ``gradio_compat``; host differences through the ``UiBackend``.
"""

# No ``from __future__ import annotations`` here: gradio finds the ``evt: gr.SelectData`` argument of a handler
# by its annotation, and not every supported gradio version resolves annotations written as strings.
import dataclasses
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gradio as gr
import yaml
from PIL import Image

from lora_trainer.config import CommonConfig, ImageConfig, save_config_snapshot
from lora_trainer.data.images import list_image_paths, open_image
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.io.text_files import read_text
from lora_trainer.jobs import FINISHED, JobRunner, JobStatus
from lora_trainer.ui import gradio_compat as compat
from lora_trainer.ui.backend import UiBackend
from lora_trainer.ui.caption_panel import CaptionPanel
from lora_trainer.ui.captioning import CaptionRunner
from lora_trainer.ui.loss_plot import render_loss_plot
from lora_trainer.ui.options import (
    CACHE_SUBFOLDER,
    QUICK_CHECK_SUFFIX,
    FormField,
    FormRequest,
    build_config,
    check_output_name,
    form_fields,
    quick_check_config,
    widget_values_from_mapping,
)
from lora_trainer.ui.start import start_training_run
from lora_trainer.ui.status_view import (
    TABLE_HEADERS,
    LoraCatalog,
    main_lora_file,
    progress_text,
    try_it_prompt,
)
from lora_trainer.ui.wording import TabWording

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
OPTIONS_PER_ROW = 4
PREVIEW_HEIGHT = 260  # pixels, about the loss plot's height
PREVIEWS_SHOWN = 8  # the newest previews; older ones stay on disk
LIST_LINES = 3  # visible lines of a one-item-per-line option (sample_prompts, datasets)
ELEM = "lora_trainer_"  # elem_id prefix: stable selectors for CSS, the WebUI's JS and browser tests


def _rows(items: Sequence[FormField], size: int) -> List[Sequence[FormField]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _make_widget(spec: FormField, wording: TabWording, visible: bool = True) -> Any:
    """The gradio component of one generated option (its help text in the tab's words)."""
    common: Dict[str, Any] = {"label": spec.label, "info": wording.say(spec.doc), "elem_id": f"{ELEM}opt_{spec.key}"}
    if not visible:
        common["visible"] = False
    if spec.kind == "checkbox":
        return gr.Checkbox(value=spec.default, **common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.kind == "number":
        return gr.Number(value=spec.default, precision=0 if spec.integer else None, **common)
    if spec.lines:  # prompts, folders: one per line
        return gr.Textbox(value=spec.default, lines=LIST_LINES, max_lines=4 * LIST_LINES, **common)
    return gr.Textbox(value=spec.default, placeholder="default" if spec.optional else None, max_lines=1, **common)


def _load_previews(paths: Sequence[str]) -> List[Tuple[Image.Image, str]]:
    """Preview files as images (not paths: gradio >= 5 refuses to serve files outside its allowed folders)."""
    images = []
    for path in list(paths)[-PREVIEWS_SHOWN:]:
        try:
            images.append((open_image(path), os.path.basename(path)))
        except ValueError:  # written while we read it, or deleted: the next poll shows it
            continue
    return images


class TrainerTab:
    """The tab's components and handlers, bound to one backend and one job runner."""

    def __init__(
        self,
        backend: UiBackend,
        runner: Optional[JobRunner] = None,
        config_cls: type = ImageConfig,
        captions: Optional[CaptionRunner] = None,
    ) -> None:
        self.backend = backend
        self.runner = runner or JobRunner()
        self.captions = captions or CaptionRunner(self.runner)  # caption jobs on the same runner
        self.config_cls = config_cls
        self.specs = form_fields(config_cls)
        self.wording = TabWording.for_fields(self.specs)
        self.hidden = set(backend.hidden_options())  # options the host decides (its precision, say)
        self.catalog = LoraCatalog()
        self._published: Dict[int, str] = {}  # job id -> the LoRA file the user will use (Lora folder)
        self.yaml_dir: Optional[str] = None  # made on the first save: configs offered for download
        self.blocks = self._build()

    # --- layout --------------------------------------------------------------------------------------------
    def _build(self) -> gr.Blocks:
        model_text = self.backend.describe_model()
        with gr.Blocks(**compat.blocks_kwargs(title=self.backend.title)) as blocks:
            with gr.Row():
                self.dataset = gr.Textbox(
                    label="Dataset folder",
                    elem_id=f"{ELEM}dataset",
                    max_lines=1,
                    placeholder="/path/to/images (captions: .txt beside each image or metadata.csv)",
                    info="More folders (regularisation, validation, own repeats): Advanced options, Datasets.",
                )
                self.output_name = gr.Textbox(
                    label="Output name",
                    elem_id=f"{ELEM}output_name",
                    max_lines=1,
                    placeholder="my_lora",
                    info="File name and the <lora:name> alias.",
                )
            self.caption_panel = CaptionPanel(self.backend, self.captions)
            self.caption_panel.build(self.dataset, blocks)
            # The standalone app asks for a path; a host with a loaded checkpoint names it instead.
            self.base_model = gr.Textbox(
                label="Base model",
                elem_id=f"{ELEM}base_model",
                max_lines=1,
                visible=model_text is None,
                placeholder="diffusers folder, .safetensors checkpoint, or Hub id owner/name"
                + (f" (blank: {self.backend.default_base_model()})" if self.backend.default_base_model() else ""),
            )
            self.model_info = gr.Markdown(model_text or "", elem_id=f"{ELEM}model_info", visible=model_text is not None)
            basic = [s for s in self.specs if not s.advanced]
            advanced = [s for s in self.specs if s.advanced]
            self.widgets: Dict[str, Any] = {}
            for row in _rows(basic, OPTIONS_PER_ROW):
                with gr.Row():
                    for spec in row:
                        self.widgets[spec.key] = _make_widget(spec, self.wording, spec.key not in self.hidden)
            with gr.Accordion("Advanced options", open=False, elem_id=f"{ELEM}advanced"):
                self.output_dir = gr.Textbox(
                    label="Output folder",
                    elem_id=f"{ELEM}output_dir",
                    max_lines=1,
                    placeholder="default: " + self.backend.default_output_dir("<output name>"),
                )
                for row in _rows(advanced, OPTIONS_PER_ROW):
                    with gr.Row():
                        for spec in row:
                            self.widgets[spec.key] = _make_widget(spec, self.wording, spec.key not in self.hidden)
            with gr.Accordion("Load / save config (YAML)", open=False, elem_id=f"{ELEM}yaml"):
                with gr.Row():
                    self.yaml_upload = gr.File(
                        label="Load a YAML config", file_types=[".yaml", ".yml"], elem_id=f"{ELEM}yaml_upload"
                    )
                    self.yaml_download = gr.File(
                        label="Saved config", interactive=False, elem_id=f"{ELEM}yaml_download"
                    )
                self.save_yaml_button = gr.Button("Save as YAML", elem_id=f"{ELEM}save_yaml")
            self.overwrite = gr.Checkbox(
                label="Overwrite an existing LoRA of the same name", value=False, elem_id=f"{ELEM}overwrite"
            )
            with gr.Row():
                self.train_button = gr.Button("Train", variant="primary", elem_id=f"{ELEM}train")
                self.quick_button = gr.Button("Quick check", elem_id=f"{ELEM}quick_check")
                self.cancel_button = gr.Button("Cancel", variant="stop", elem_id=f"{ELEM}cancel")
            self.notice = gr.Markdown("", elem_id=f"{ELEM}notice")
            self.progress = gr.Textbox(
                label="Progress",
                value=progress_text(JobStatus()),
                lines=2,
                interactive=False,
                elem_id=f"{ELEM}progress",
            )
            with gr.Row():
                # The plot carries its own title: gradio's label would cover its top-left corner.
                self.loss_plot = gr.Image(
                    value=render_loss_plot([], []),
                    label="Loss",
                    show_label=False,
                    type="pil",
                    interactive=False,
                    elem_id=f"{ELEM}loss_plot",
                )
                self.gallery = gr.Gallery(
                    label="Previews", columns=4, height=PREVIEW_HEIGHT, object_fit="contain", elem_id=f"{ELEM}previews"
                )
            self.lora_list = gr.Dataframe(
                label="Finished LoRA files (select one to try it)",
                elem_id=f"{ELEM}lora_list",
                value=compat.table_value(TABLE_HEADERS, []),  # column names, not "1 2 3", while empty
                **compat.dataframe_kwargs(TABLE_HEADERS),
            )
            with gr.Row():
                # interactive: gradio would otherwise lock an output-only box, and the user edits the prompt here
                self.try_it = gr.Textbox(
                    label="Try it: add this to your prompt", elem_id=f"{ELEM}try_it", max_lines=1, interactive=True
                )
                send_js = self.backend.send_prompt_js()
                if send_js:
                    send = gr.Button("Send to txt2img", elem_id=f"{ELEM}send_to_txt2img")
                    send.click(None, inputs=[self.try_it], outputs=None, **compat.js_kwargs(send_js))
            # Set by the poll once a run's LoRA is published; its change event makes the host's page list it
            # (the host's own Lora refresh, done in the browser: backend.refresh_loras_js).
            self.published = gr.Textbox("", visible=compat.in_page_hidden(), elem_id=f"{ELEM}published")
            self.seen = gr.State({})
            self._wire(blocks)
        return blocks

    @property
    def form_inputs(self) -> List[Any]:
        """The components a start/save handler reads, in the order of its arguments."""
        return [
            self.dataset,
            self.base_model,
            self.output_name,
            self.output_dir,
            self.overwrite,
            *[self.widgets[s.key] for s in self.specs],
        ]

    def _wire(self, blocks: gr.Blocks) -> None:
        self.train_button.click(self.start_training, inputs=self.form_inputs, outputs=[self.notice])
        self.quick_button.click(self.start_quick_check, inputs=self.form_inputs, outputs=[self.notice])
        self.cancel_button.click(self.cancel, inputs=None, outputs=[self.notice])
        self.save_yaml_button.click(self.save_yaml, inputs=self.form_inputs, outputs=[self.yaml_download, self.notice])
        self.yaml_upload.change(
            self.load_yaml,
            inputs=[self.yaml_upload],
            outputs=[
                self.dataset,
                self.base_model,
                self.output_name,
                self.output_dir,
                *[self.widgets[s.key] for s in self.specs],
                self.notice,
            ],
        )
        self.lora_list.select(self.pick_lora, inputs=[self.lora_list], outputs=[self.try_it])
        refresh_js = self.backend.refresh_loras_js()
        if refresh_js:
            self.published.change(None, inputs=[self.published], outputs=None, **compat.js_kwargs(refresh_js))
        compat.poll(self.poll, inputs=[self.seen], outputs=self.poll_outputs, seconds=POLL_SECONDS, blocks=blocks)

    @property
    def poll_outputs(self) -> List[Any]:
        return [
            self.progress,
            self.loss_plot,
            self.gallery,
            self.lora_list,
            self.try_it,
            self.model_info,
            self.published,
            self.seen,
        ]

    # --- handlers ------------------------------------------------------------------------------------------
    def _config_from_form(
        self, dataset: str, base_model: str, output_name: str, output_dir: str, values: Sequence[Any]
    ) -> CommonConfig:
        name = check_output_name(output_name)
        request = FormRequest(
            train_data_dir=dataset,
            base_model=self.backend.resolve_base_model(base_model),
            output_name=name,
            output_dir=output_dir,
        )
        cfg = build_config(
            request,
            self.specs,
            values,
            default_output_dir=self.backend.default_output_dir(name),
            cls=self.config_cls,
            default_base_model=self.backend.default_base_model(),
        )
        if isinstance(cfg, ImageConfig) and not cfg.cache_dir:
            # Never write into the user's dataset folder unless asked: the cache lives with the run.
            cfg = dataclasses.replace(cfg, cache_dir=os.path.join(cfg.output_dir, CACHE_SUBFOLDER))
        return cfg

    def _check_inputs(self, cfg: CommonConfig, base_model: str) -> None:
        """What would fail a run early, checked before saying it started (raises ConfigError, tab labels)."""
        folders = [("Dataset folder", cfg.train_data_dir)] if cfg.train_data_dir else []
        folders += [("Datasets", entry.image_dir) for entry in getattr(cfg, "datasets", None) or []]
        for label, folder in folders:
            self._check_folder(label, folder)
        typed = (base_model or "").strip()
        if self.base_model.visible and _looks_local(typed) and not os.path.exists(typed):
            raise ConfigError(f'"Base model" `{typed}` does not exist: give a diffusers folder or a checkpoint file.')

    @staticmethod
    def _check_folder(label: str, folder: str) -> None:
        if not os.path.isdir(folder):
            raise ConfigError(f'"{label}" `{folder}` does not exist or is not a folder.')
        try:
            images = list_image_paths(folder)
        except OSError as exc:
            raise ConfigError(f'"{label}" `{folder}` cannot be read: {exc}') from None
        if not images:
            raise ConfigError(
                f'"{label}" `{folder}` has no images: add .png, .jpg or .webp files '
                "(sub-folders named like 10_style are read too)."
            )

    def _start(
        self,
        quick: bool,
        dataset: str,
        base_model: str,
        output_name: str,
        output_dir: str,
        overwrite: bool,
        values: Sequence[Any],
    ) -> str:
        label = "Quick check" if quick else "Train"
        try:
            cfg = self._config_from_form(dataset, base_model, output_name, output_dir, values)
            self._check_inputs(cfg, base_model)
            if quick:  # its own name and folder: a quick check never touches the real run's files
                quick_name = (cfg.output_name or "lora") + QUICK_CHECK_SUFFIX
                cfg = quick_check_config(cfg, self.backend.default_output_dir(quick_name))
            started = start_training_run(
                self.runner,
                self.backend,
                cfg,
                label=label,
                overwrite=quick or overwrite,  # a quick check replaces its own earlier one
                how_to_overwrite='tick "Overwrite an existing LoRA of the same name"',
                drop_old_states=not quick,  # overwriting a LoRA drops its earlier run's states
            )
            self._published[started.job.status().job_id] = started.lora_file
        except LoraTrainerError as exc:
            return f"**{label} not started:** {self.wording.say(str(exc))}"
        except Exception as exc:  # a bug must not leave the button dead without a word
            log.exception("Could not start training")
            return f"**{label} not started:** unexpected error {type(exc).__name__}: {exc}"
        # This notice stays while the run goes on and after it ends (cancelled, failed): it says what happens
        # when the run finishes, and leaves how it went to the Progress box that the poll keeps current.
        text = (
            f"**{label} started:** {cfg.output_name}. When it finishes, the LoRA will be `{started.lora_file}`; "
            "Progress below says how the run goes."
        )
        return f"{text}\n\n{started.memory_estimate}" if started.memory_estimate else text

    def start_training(
        self, dataset: str, base_model: str, output_name: str, output_dir: str, overwrite: bool, *values: Any
    ) -> str:
        return self._start(False, dataset, base_model, output_name, output_dir, overwrite, values)

    def start_quick_check(
        self, dataset: str, base_model: str, output_name: str, output_dir: str, overwrite: bool, *values: Any
    ) -> str:
        return self._start(True, dataset, base_model, output_name, output_dir, overwrite, values)

    def cancel(self) -> str:
        if self.runner.cancel():
            return "Cancelling: the run stops after the current step and keeps its last save."
        return "Nothing is running."

    def save_yaml(
        self, dataset: str, base_model: str, output_name: str, output_dir: str, overwrite: bool, *values: Any
    ) -> Tuple[Any, str]:
        try:
            cfg = self._config_from_form(dataset, base_model, output_name, output_dir, values)
        except LoraTrainerError as exc:
            return compat.no_change(), f"**Not saved:** {exc}"
        if self.yaml_dir is None:
            self.yaml_dir = tempfile.mkdtemp(prefix="lora_trainer_yaml_")
        path = os.path.join(self.yaml_dir, f"{cfg.output_name}.yaml")
        save_config_snapshot(cfg, path)
        return path, f"Config saved as `{os.path.basename(path)}`: download it above."

    def load_yaml(self, upload: Any) -> List[Any]:
        """Fill the form from an uploaded YAML; options it does not mention keep their current values."""
        keep = [compat.no_change()] * (4 + len(self.specs))
        path = compat.file_path(upload)
        if not path:
            return keep + [compat.no_change()]
        try:
            raw = yaml.safe_load(read_text(path, ConfigError)) or {}
        except (OSError, ConfigError, yaml.YAMLError) as exc:
            return keep + [f"**Not loaded:** {os.path.basename(path)} is not readable YAML: {exc}"]
        if not isinstance(raw, dict):
            return keep + ["**Not loaded:** the file must hold key: value pairs at the top level."]
        task = raw.get("task_type", "image-generation")
        if task != "image-generation":
            return keep + [f"**Not loaded:** this tab trains image LoRAs; the file has task_type {task!r}."]
        values, unknown = widget_values_from_mapping(self.specs, raw, self.config_cls)
        values = [v if s.key in raw else compat.no_change() for s, v in zip(self.specs, values, strict=True)]
        head = [
            str(raw[k]) if raw.get(k) is not None else compat.no_change()
            for k in ("train_data_dir", "base_model", "output_name", "output_dir")
        ]
        note = f"Loaded {os.path.basename(path)}."
        if unknown:
            note += " Ignored unknown keys: " + ", ".join(unknown) + "."
        return head + values + [note]

    def pick_lora(self, table: Any, evt: gr.SelectData) -> Any:
        rows = compat.table_rows(table)
        index = compat.selected_row(evt)
        if index is None or not 0 <= index < len(rows):
            return compat.no_change()
        return try_it_prompt(str(rows[index][-1]))

    def poll(self, seen: Optional[Dict[str, Any]]) -> List[Any]:
        """Refresh what changed since this page's last poll (``seen`` is per page), leave the rest alone."""
        seen = dict(seen or {})
        status = self.runner.status()
        out: List[Any] = []

        def send(key: str, marker: Any, make: Any) -> None:
            if seen.get(key) == marker:
                out.append(compat.no_change())
            else:
                seen[key] = marker
                out.append(make())

        text = progress_text(self._shown_status(status))
        send("progress", text, lambda: text)
        send(
            "plot",
            (status.job_id, len(status.losses), len(status.validation_losses)),
            lambda: render_loss_plot(
                status.loss_steps, status.losses, validation=(status.validation_steps, status.validation_losses)
            ),
        )
        send("previews", (status.job_id, status.previews), lambda: _load_previews(status.previews))
        rows = self.catalog.rows(self.backend.lora_dir())
        send("files", rows, lambda: compat.table_value(TABLE_HEADERS, rows))
        out.append(self._try_it_update(status, seen))
        model_text = self.backend.describe_model()
        send("model", model_text, lambda: compat.update(value=model_text or ""))
        published = self._published_marker(status)
        send("published", published, lambda: published)
        out.append(seen)
        return out

    def _published_file(self, status: JobStatus) -> Optional[str]:
        """The file a finished run's user will use, once it is there (the Lora folder's copy in a WebUI)."""
        if status.state != FINISHED:
            return None
        path = self._published.get(status.job_id) or main_lora_file(status.output_files, status.output_name)
        return path if path and os.path.isfile(path) else None

    def _published_marker(self, status: JobStatus) -> str:
        path = self._published_file(status)
        return f"{status.job_id}:{os.path.basename(path)}" if path else ""

    def _shown_status(self, status: JobStatus) -> JobStatus:
        """The status in the tab's words; a finished run says where its LoRA is and the tag to type."""
        path = self._published_file(status)
        if path is None:
            return dataclasses.replace(status, message=self.wording.say(status.message))
        message = (
            f"Your LoRA: {path}\nType {try_it_prompt(path)} in a prompt to use it. "
            f"Run details (training states, logs, previews): {status.output_dir}"
        )
        return dataclasses.replace(status, message=message)

    def _try_it_update(self, status: JobStatus, seen: Dict[str, Any]) -> Any:
        """Fill "Try it" once when a run finishes; afterwards the user's edits stay."""
        if status.state != FINISHED or seen.get("try_it") == status.job_id:
            return compat.no_change()
        path = self._published.get(status.job_id) or main_lora_file(status.output_files, status.output_name)
        if path is None:
            return compat.no_change()
        seen["try_it"] = status.job_id
        return try_it_prompt(path)


def _looks_local(typed: str) -> bool:
    """A path on this machine rather than a Hugging Face repo id (``owner/name``)."""
    if not typed:
        return False
    lowered = typed.lower()
    return (
        os.path.isabs(typed)
        or typed.startswith((".", "~"))
        or "\\" in typed
        or typed.count("/") > 1
        or lowered.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth"))
    )


def build_tab(
    backend: UiBackend, runner: Optional[JobRunner] = None, captions: Optional[CaptionRunner] = None
) -> gr.Blocks:
    """The trainer tab for ``backend``; ``runner`` is the host's one job runner (a new one when None), and
    ``captions`` its one caption runner (a new one bound to ``runner`` when None)."""
    return TrainerTab(backend, runner, captions=captions).blocks
