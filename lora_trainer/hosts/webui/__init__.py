"""The WebUI glue: the only code of the package that imports the WebUI's ``modules.*`` (always inside functions,
so importing it costs nothing and works outside the WebUI; the tests inject stand-in ``modules`` packages).

One concept per module:

- ``facts``: the loaded model, device and precision, folders, settings and API credentials;
- ``host``: what a host file answers, and a run's plan (in place, from the checkpoint file, or refused);
- one file per host: ``a1111`` (ldm/sgm, in place), ``forge`` (Forge Neo and lllyasviel's Forge, in place),
  ``reforge`` (reForge, Forge Classic) and ``unrecognised`` (from the file); ``detect`` picks one by what the
  loaded model is;
- ``from_file``: the path for what cannot train in place (free the host's model, train from its file, reload);
- ``builtin_lora``: the builtin Lora extension's merged weights, publishing into the Lora folder, refreshing;
- ``progress``: the GPU queue lock and progress bar for a job, Interrupt, previews with the host's txt2img;
- ``interrogators``: the host's BLIP / CLIP / DeepBooru as caption-panel captioners;
- ``backend``: ``WebUIBackend``, the tab's and the REST API's answers, written once for every host.
"""

from lora_trainer.errors import ConfigError
from lora_trainer.hosts.webui.a1111 import model_refusal, refusal
from lora_trainer.hosts.webui.backend import WebUIBackend, WebUITraining, estimate_extra_memory
from lora_trainer.hosts.webui.builtin_lora import publish_lora, refresh_host_networks, unload_host_networks
from lora_trainer.hosts.webui.facts import (
    HostFacts,
    api_credentials,
    architecture,
    host_facts,
    jobs_dir,
    lora_dir,
    parse_api_auth,
)
from lora_trainer.hosts.webui.interrogators import (
    CAPTION_STATE_JOB_NAME,
    HOST_BLIP,
    HOST_BLIP_CLIP,
    HOST_DEEPBOORU,
    HostCaptioner,
    HostCaptionProgress,
    HostWeights,
    host_caption_session,
    host_captioner_loaders,
)
from lora_trainer.hosts.webui.progress import HostPreviews, HostProgress, PreviewSettings, render_host_preview
from lora_trainer.train.callbacks import TrainingCallback

__all__ = [
    "CAPTION_STATE_JOB_NAME",
    "ConfigError",
    "HOST_BLIP",
    "HOST_BLIP_CLIP",
    "HOST_DEEPBOORU",
    "HostCaptionProgress",
    "HostCaptioner",
    "HostFacts",
    "HostPreviews",
    "HostProgress",
    "HostWeights",
    "PreviewSettings",
    "TrainingCallback",
    "WebUIBackend",
    "WebUITraining",
    "api_credentials",
    "architecture",
    "estimate_extra_memory",
    "host_caption_session",
    "host_captioner_loaders",
    "host_facts",
    "jobs_dir",
    "lora_dir",
    "model_refusal",
    "parse_api_auth",
    "publish_lora",
    "refresh_host_networks",
    "refusal",
    "render_host_preview",
    "unload_host_networks",
]
