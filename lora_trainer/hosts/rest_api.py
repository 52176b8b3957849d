"""REST routes for automation: start a training job from a config, poll its status, cancel it.

Mounted by the WebUI glue with ``on_app_started``; nothing here imports the WebUI, so the routes are tested
with a fake runner and backend. The host does not protect extension routes, so the host's ``--api-auth``
credentials are checked here (HTTP basic, constant-time comparison), and a request can only make the run
write inside the host's Lora folder and the job's own output folder.

Routes (all JSON; errors are ``{"error": "..."}`` with a 4xx/5xx status):

- ``POST {prefix}/train``: ``{"config": {...} or "yaml text", "overwrite": false, "preview": {...}}``
  starts a job (409 while one runs);
- ``GET {prefix}/status``: the current or last job (``?history=1`` adds the loss history);
- ``POST {prefix}/cancel``: asks the running job to stop after its current step.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' ``request: Request`` annotations, and
# ``Request`` is imported inside create_router (fastapi loads only when the routes are mounted).
import base64
import binascii
import dataclasses
import logging
import os
import secrets
from typing import Any, Dict, Mapping, Optional

import yaml

from lora_trainer.config import CommonConfig, check_output_name, config_from_dict, resolved_output_name
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.jobs import JobBusyError, JobRunner, JobStatus
from lora_trainer.ui.backend import UiBackend
from lora_trainer.ui.start import LoraFileExists, start_training_run

log = logging.getLogger(__name__)

PREFIX = "/lora-trainer/v1"
# Config keys naming folders the run writes to; each must stay inside the allowed places.
WRITE_KEYS = ("output_dir", "logging_dir", "cache_dir")
CACHE_SUBFOLDER = "cache"  # the encoding cache goes into the job folder (the engine's default is the dataset)


class RequestError(LoraTrainerError):
    """A request the API refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- authentication ------------------------------------------------------------------------------------------
def check_basic_auth(header: Optional[str], credentials: Mapping[str, str]) -> bool:
    """True when no credentials are configured or ``header`` carries a matching user and password."""
    if not credentials:
        return True
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, sep, password = decoded.partition(":")
    if not sep:
        return False
    ok = False
    for known_user, known_password in credentials.items():  # compare with every entry: no early exit
        match = secrets.compare_digest(user.encode(), known_user.encode())
        match &= secrets.compare_digest(password.encode(), known_password.encode())
        ok |= match
    return ok


# --- turning a request into a safe config ------------------------------------------------------------------
def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _has_traversal(value: Any) -> bool:
    return isinstance(value, str) and ".." in value.replace("\\", "/").split("/")


def parse_config_field(raw: Any) -> Dict[str, Any]:
    """The request's ``config``: a mapping, or YAML text holding one."""
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RequestError(f"config is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RequestError(
            "config must be a mapping of options (JSON object or YAML text), e.g. "
            '{"train_data_dir": "/data/cats", "output_name": "cats"}.'
        )
    return dict(raw)


def build_safe_config(raw: Mapping[str, Any], backend: UiBackend) -> CommonConfig:
    """Validate options and every folder the run writes to; relative write folders are refused."""
    raw = dict(raw)
    for key in WRITE_KEYS:
        if _has_traversal(raw.get(key)):
            raise RequestError(f"{key}: '..' is not allowed in paths.")
        if raw.get(key) and not os.path.isabs(os.path.expanduser(str(raw[key]))):
            raise RequestError(f"{key}: give an absolute path (or leave it out for the default).")
    if raw.get("task_type", "image-generation") != "image-generation":
        raise RequestError("task_type: this API trains image LoRAs on the WebUI's loaded checkpoint.")
    name = raw.get("output_name")
    if name is None and not raw.get("output_dir"):
        raise RequestError("output_name is required: it becomes the file name and the <lora:name> alias.")
    if name is not None:
        raw["output_name"] = check_output_name(str(name))
    raw.setdefault("base_model", backend.resolve_base_model(""))
    if not raw.get("output_dir"):
        raw["output_dir"] = backend.default_output_dir(raw["output_name"])
    cfg = config_from_dict(raw)
    check_output_name(resolved_output_name(cfg))  # a name taken from the folder must be safe too

    roots = [backend.lora_dir(), os.path.dirname(backend.default_output_dir("x"))]
    if not any(_inside(cfg.output_dir, root) for root in roots):
        raise RequestError(
            f"output_dir must be inside the Lora folder ({roots[0]}) or the trainer's job "
            f"folder ({roots[1]}); got {cfg.output_dir}."
        )
    changes: Dict[str, Any] = {}
    for key in ("logging_dir", "cache_dir"):
        value = getattr(cfg, key, None)
        if value and not _inside(value, cfg.output_dir):
            raise RequestError(f"{key} must be inside the job's output folder ({cfg.output_dir}); got {value}.")
    if hasattr(cfg, "cache_dir") and not cfg.cache_dir:
        changes["cache_dir"] = os.path.join(cfg.output_dir, CACHE_SUBFOLDER)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def status_json(status: JobStatus, history: bool = False) -> Dict[str, Any]:
    data = dataclasses.asdict(status)
    for key, value in data.items():
        if isinstance(value, tuple):
            data[key] = list(value)
    if not history:
        data.pop("loss_steps")
        data.pop("losses")
    data["last_loss"] = status.last_loss
    data["running"] = status.running
    return data


# --- the service (framework-free, so tests call it directly too) ---------------------------------------------
class TrainerApi:
    """What the routes do, given the host's one runner and its backend."""

    def __init__(self, runner: JobRunner, backend: UiBackend) -> None:
        self.runner = runner
        self.backend = backend

    def train(self, body: Any) -> Dict[str, Any]:
        if not isinstance(body, dict):
            raise RequestError('The body must be a JSON object: {"config": {...}, "overwrite": false}.')
        unknown = set(body) - {"config", "overwrite", "preview"}
        if unknown:
            raise RequestError(f"Unknown field(s) {', '.join(sorted(unknown))}; use config, overwrite, preview.")
        if "config" not in body:
            raise RequestError("config is required: the training options as an object or YAML text.")
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise RequestError("overwrite must be true or false.")
        cfg = build_safe_config(parse_config_field(body["config"]), self.backend)
        started = start_training_run(
            self.runner,
            self.backend,
            cfg,
            label="Train",
            overwrite=overwrite,
            how_to_overwrite='send "overwrite": true',
            preview=body.get("preview"),  # validated by the host that renders previews
        )
        job, target, estimate = started.job, started.lora_file, started.memory_estimate
        return {
            "job_id": job.status().job_id,
            "output_name": resolved_output_name(cfg),
            "output_dir": cfg.output_dir,
            "lora_file": target,
            "memory_estimate": estimate,
            "status": status_json(job.status()),
        }

    def status(self, history: bool = False) -> Dict[str, Any]:
        return status_json(self.runner.status(), history)

    def cancel(self) -> Dict[str, Any]:
        cancelled = self.runner.cancel()
        return {
            "cancelled": cancelled,
            "message": "Stopping after the current step; the last save is kept."
            if cancelled
            else "Nothing is running.",
            "status": status_json(self.runner.status()),
        }


def error_status(exc: Exception) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, (JobBusyError, LoraFileExists)):
        return 409
    if isinstance(exc, (ConfigError, LoraTrainerError)):
        return 400
    return 500


# --- FastAPI wiring ----------------------------------------------------------------------------------------
def create_router(
    runner: JobRunner, backend: UiBackend, credentials: Optional[Mapping[str, str]] = None, prefix: str = PREFIX
) -> Any:
    """An ``APIRouter`` with the three routes; ``credentials`` {user: password} turns on HTTP basic auth."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    api = TrainerApi(runner, backend)
    creds = dict(credentials or {})
    router = APIRouter()

    def denied(request: Request) -> Optional[JSONResponse]:
        if check_basic_auth(request.headers.get("authorization"), creds):
            return None
        return JSONResponse(
            {"error": "Authentication required (the WebUI's --api-auth credentials)."},
            status_code=401,
            headers={"WWW-Authenticate": "Basic"},
        )

    async def answer(call: Any) -> JSONResponse:
        try:
            # In a worker thread: starting a job may load the checkpoint, which must not block the server.
            return JSONResponse(await run_in_threadpool(call))
        except Exception as exc:
            code = error_status(exc)
            if code >= 500:
                log.exception("LoRA trainer API request failed")
                message = f"Unexpected error: {type(exc).__name__}: {exc}"
            else:
                message = str(exc)
            return JSONResponse({"error": message}, status_code=code)

    # Plain Request parameters (no pydantic models): the same code under fastapi 0.94/pydantic 1 and later.
    @router.post(prefix + "/train")
    async def train(request: Request) -> JSONResponse:
        refused = denied(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "The body must be JSON."}, status_code=400)
        return await answer(lambda: api.train(body))

    @router.get(prefix + "/status")
    async def status(request: Request) -> JSONResponse:
        refused = denied(request)
        if refused is not None:
            return refused
        history = request.query_params.get("history", "").lower() in ("1", "true", "yes")
        return await answer(lambda: api.status(history))

    @router.post(prefix + "/cancel")
    async def cancel(request: Request) -> JSONResponse:
        refused = denied(request)
        return refused if refused is not None else await answer(api.cancel)

    return router


def mount(app: Any, runner: JobRunner, backend: UiBackend, credentials: Optional[Mapping[str, str]] = None) -> None:
    """Add the routes to the host's FastAPI ``app``."""
    app.include_router(create_router(runner, backend, credentials))


__all__ = [
    "PREFIX",
    "RequestError",
    "TrainerApi",
    "build_safe_config",
    "check_basic_auth",
    "create_router",
    "mount",
    "parse_config_field",
    "status_json",
]
