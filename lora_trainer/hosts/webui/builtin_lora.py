"""The builtin Lora extension's state, and publishing a finished LoRA into the Lora folder.

AUTOMATIC1111's extension (module ``networks``) merges LoRA deltas into the live weights and keeps them merged
between generations: before training they are unloaded (or we would train on a modified model), and after a
file is rewritten the host must forget what it remembers under that name.

Files: the engine writes into a job folder outside the Lora folder (intermediate saves, states, logs, previews,
the diffusers-named copy); only the final ``<name>.safetensors`` is copied, atomically, into the Lora folder,
so the host's Lora list never shows intermediates or two files with one alias.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

BUILTIN_LORA_MODULE = "networks"  # the builtin Lora extension's module (we never name a module like it)
PUBLISHED_FILE_MODE = 0o644


def builtin_networks() -> Any:
    """The builtin Lora extension's ``networks`` module when the host loaded it, else None (disabled)."""
    return sys.modules.get(BUILTIN_LORA_MODULE)


def _restore_module(networks: Any, module: Any) -> bool:
    """Put one module's backed-up weights back and forget what was applied; True if it had a backup."""
    had_backup = (
        getattr(module, "network_weights_backup", None) is not None
        or getattr(module, "network_bias_backup", None) is not None
    )
    if had_backup:
        networks.network_restore_weights_from_backup(module)
    # Cleared even without a backup: an empty name tuple is what a never-touched module has.
    module.network_current_names = ()
    module.network_weights_backup = None
    module.network_bias_backup = None
    return had_backup


def unload_host_networks(model: Any, networks: Any = None) -> int:
    """Undo every LoRA the host merged into ``model``'s weights; returns how many modules were restored.

    The builtin extension keeps deltas merged between generations; training on them would train on a
    modified model. Its next generation re-applies whatever that prompt asks for, from restored weights.
    """
    import torch

    networks = networks if networks is not None else builtin_networks()
    if networks is None or model is None:
        return 0
    restored = 0
    # The host restores with an in-place copy_ into parameters that require grad (the WebUI loads the UNet
    # that way); it only ever does so inside a no-grad forward, and so must we.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "network_current_names") or hasattr(module, "network_weights_backup"):
                restored += _restore_module(networks, module)
    networks.loaded_networks.clear()
    return restored


def refresh_host_networks(name: str, model: Any = None, networks: Any = None) -> None:
    """After ``name``'s file was (re)written: rescan the Lora folder and drop what the host remembers of it."""
    networks = networks if networks is not None else builtin_networks()
    if networks is None:
        return
    networks.networks_in_memory.pop(name, None)
    if any(getattr(net, "name", None) == name for net in networks.loaded_networks):
        unload_host_networks(model, networks)  # merged old weights must not survive under the same name
    networks.list_available_networks()


def publish_lora(produced: str, target: str) -> None:
    """Copy the run's final file to ``target`` in the Lora folder, atomically, readable by other programs."""
    if os.path.abspath(target) == os.path.abspath(produced):
        return
    from lora_trainer.io.atomic import atomic_write

    def copy(tmp: str) -> None:
        shutil.copyfile(produced, tmp)
        # The temporary file is created private (0600); the Lora folder's files are normally readable by the
        # other programs that share the folder (another WebUI, a file server, backups).
        os.chmod(tmp, PUBLISHED_FILE_MODE)

    atomic_write(target, copy)
