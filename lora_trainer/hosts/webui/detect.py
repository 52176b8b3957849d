"""Which host file drives the loaded model: decided by what the model is, not by which WebUI it came from.

Forge's engine (``forge_objects_original`` with a KModel predictor) -> ``forge``; an AUTOMATIC1111-style
model carrying ``forge_objects`` (reForge, Forge Classic) -> ``reforge``; an ldm/sgm model -> ``a1111``;
anything else -> ``unrecognised`` (trained from the checkpoint file when possible).
"""

from __future__ import annotations

from typing import Any

from lora_trainer.hosts.webui.a1111 import A1111Host
from lora_trainer.hosts.webui.forge import ForgeHost
from lora_trainer.hosts.webui.host import WebUIHost
from lora_trainer.hosts.webui.reforge import ReForgeHost
from lora_trainer.hosts.webui.unrecognised import UnrecognisedHost

HOSTS = (ForgeHost(), ReForgeHost(), A1111Host())
FALLBACK = UnrecognisedHost()


def host_for(model: Any) -> WebUIHost:
    """The first host file that knows ``model`` (the order matters: Forge's objects before ldm's)."""
    for host in HOSTS:
        if host.matches(model):
            return host
    return FALLBACK
