"""What SD1, SD2 and SDXL share: an ldm/sgm UNet with CLIP text encoders, trained on the DDPM schedule.

Each of the three is a small subclass (``sd1.py``, ``sd2.py``, ``sdxl.py``) setting what differs: the text
encoders' keys in a single file, attention heads, the VAE scale, SDXL's size conditioning and pooled text
embedding, sgm-named LoRA modules, and the metadata values. The loading code they share lives in
``models/architecture.py`` (configs from a checkpoint's keys), ``models/loading.py`` and
``models/diffusers_adapter.py``; it reads these attributes instead of testing a family's name.
"""

from __future__ import annotations

import json
import os
from typing import Any, Collection, Dict, List, Tuple

from lora_trainer.lora.registry import NETWORK_TYPE_NAMES
from lora_trainer.lora.targets import UNET_CONTAINERS, UNET_CONV_CONTAINERS
from lora_trainer.models.families.base import ModelFamily, adapter_class

UNET_PREFIX = "model.diffusion_model."
# Marker tensors of v-prediction / zero-terminal-SNR descendants, read as Forge Neo and ComfyUI read them.
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
VAE_PREFIX = "first_stage_model."


class UNetFamily(ModelFamily):
    # (key prefix in a single file, open_clip layout) of each text encoder, in encoder order.
    checkpoint_text_encoders: Tuple[Tuple[str, bool], ...] = ()
    vae_scaling_factor: float = 0.18215
    unet_sample_size: int = 64
    # The text encoder's penultimate layer is its output (SD2): clip_skip counts from there.
    text_uses_penultimate_layer: bool = False
    # SDXL: concatenated hidden states of two encoders, a pooled embedding and size/crop conditioning.
    size_conditioning: bool = False
    # sd-scripts names SDXL UNet modules by their sgm block paths, SD1/SD2 by their diffusers paths.
    kohya_sgm_unet_names: bool = False
    # Diffusers pipeline class written into a diffusers folder's model_index.json.
    pipeline_class: str = "StableDiffusionPipeline"
    lora_containers = UNET_CONTAINERS
    conv_containers = UNET_CONV_CONTAINERS
    network_types = NETWORK_TYPE_NAMES  # kohya UNet files: every type is applied by the WebUI, ComfyUI, diffusers

    # ------------------------------------------------------------ recognising the model

    def claims_checkpoint(self, keys: Collection[str]) -> bool:
        keys = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
        if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
            return False
        return all(any(k.startswith(prefix) for k in keys) for prefix, _ in self.checkpoint_text_encoders)

    def claims_diffusers_folder(self, index: Dict[str, Any], path: str) -> bool:
        if "unet" not in index:
            return False
        return self._claims_unet_folder(index, _unet_config(path))

    def _claims_unet_folder(self, index: Dict[str, Any], unet_config: Dict[str, Any]) -> bool:
        return False

    def attention_heads(self, block_out_channels: List[int]) -> Any:
        """diffusers' ``attention_head_dim`` (which, for these UNets, is the number of heads)."""
        return [max(1, c // 64) for c in block_out_channels]

    def tokenizer_pads_with_end_token(self, index: int) -> bool:
        """HF CLIP encoders pad with the end token; open_clip-trained ones (SD2, SDXL's second) with "!"."""
        return not self.checkpoint_text_encoders[index][1]

    # ------------------------------------------------------------ standalone engine

    standalone_adapter = (
        "lora_trainer.models.diffusers_adapter:DiffusersAdapter"  # imported on first use (``adapter_class``)
    )

    def open_standalone(self, path: str, *, reference: str = "", cfg=None, model_name=None, **options):
        DiffusersAdapter = adapter_class(self.standalone_adapter)
        # The reference as given (a Hub id stays one: the adapter names the model by it; the cache answers).
        return DiffusersAdapter(reference or path, **options)

    def objective(self, prediction_type: str, alphas_cumprod, cfg=None):
        from lora_trainer.train.objectives import DdpmObjective

        return DdpmObjective(
            alphas_cumprod,
            prediction_type,
            noise_offset=getattr(cfg, "noise_offset", 0.0) or 0.0,
            min_snr_gamma=getattr(cfg, "min_snr_gamma", None),
        )

    # ------------------------------------------------------------ the LoRA file

    def unet_lora_name(self, diffusers_path: str, names) -> str:
        """The kohya name of a UNet module given its diffusers path (``names``: the model's ``UNetNameMap``)."""
        if self.kohya_sgm_unet_names:
            ldm = names.to_ldm(diffusers_path)
            if ldm is None:
                raise ValueError(f"no sgm name for UNet module {diffusers_path}")
            return "lora_unet_" + ldm.replace(".", "_")
        return "lora_unet_" + diffusers_path.replace(".", "_")

    def unet_lora_name_from_ldm(self, ldm_path: str, names) -> str:
        """The kohya name of a UNet module given its ldm/sgm path (a WebUI host's live model)."""
        if self.kohya_sgm_unet_names:
            return "lora_unet_" + ldm_path.replace(".", "_")
        diffusers = names.to_diffusers(ldm_path)
        if diffusers is None:
            raise ValueError(f"no diffusers name for UNet module {ldm_path}")
        return "lora_unet_" + diffusers.replace(".", "_")

    def default_prediction_type(self, keys: Collection[str] = ()) -> str:
        """v when the file carries the ``v_pred`` marker tensor (NoobAI-style SDXL descendants), else eps."""
        return "v_prediction" if V_PRED_KEY in keys else "epsilon"

    def zero_terminal_snr(self, keys: Collection[str]) -> bool:
        """Whether the file carries the ``ztsnr`` marker: its noise schedule ends at zero SNR."""
        return ZTSNR_KEY in keys

    def resolution_of(self, prediction_type: str) -> int:
        return self.native_resolution


def _unet_config(path: str) -> Dict[str, Any]:
    config_path = os.path.join(path, "unet", "config.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding="utf-8") as fh:
        return json.load(fh)
