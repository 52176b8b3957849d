"""What a model family is: everything that differs between SD1, SD2, SDXL, Flux, Z-Image... in one object.

The rest of the engine asks the family and never tests a family's name: how to recognise its checkpoints
and diffusers folders, how the standalone engine loads it, what its training objective is (DDPM eps/v, flow
matching), how its LoRA modules are named in the file, which base-model version and ModelSpec architecture
the file's metadata records, and what a host's loaded model of this family looks like. Adding a family is one
module beside this one plus its registration in ``families/__init__.py`` (see the README).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Collection, Dict, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lora_trainer.models.adapter import DiffusionAdapter
    from lora_trainer.train.objectives import TrainingObjective


# ModelSpec (https://github.com/Stability-AI/ModelSpec) implementation URLs, as sd-scripts writes them.
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"


def adapter_class(reference: str) -> Any:
    """The class named by ``reference`` (``"package.module:Class"``), imported on first use.

    A family names its standalone adapter this way instead of importing it: an adapter module imports its
    family's module (constants, key layouts) and the shared loaders, which read the family registry to detect
    a checkpoint, so a direct import back from the family would tie them into one cycle. Dependencies run
    adapter -> family; the family only holds the adapter's name, as diffusers' pipelines name their components.
    Raises ImportError/AttributeError when the reference is wrong (a programming error, caught by the tests).
    """
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


class ModelFamily:
    """One model family. Subclasses set the class attributes and override what differs.

    ``name`` is the engine's short name (``sd1``, ``sdxl``, ``flux``...) used in logs, the config snapshot and
    the disk caches' keys; ``label`` is what the UI shows.
    """

    name: str = ""
    label: str = ""
    # Default training resolution (one side, pixels): what the family was trained at.
    native_resolution: int = 512
    # Memory of one native-resolution sample's activations relative to SD1 at 512 px (host estimates).
    activation_factor: float = 1.0
    # The kohya prefix of each text encoder's LoRA modules, in encoder order.
    text_lora_prefixes: tuple = ("lora_te_",)
    # Flow-matching families have no prediction type in ModelSpec (sd-scripts leaves it out for Flux).
    prediction_types: tuple = ("epsilon", "v_prediction")
    # The standalone adapter can store the frozen denoiser's Linears in fp8 (``fp8_base``).
    supports_fp8_base: bool = False
    # Every tensor name in the family's LoRA file starts with one of these (checked before writing).
    lora_file_prefixes: tuple = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
    # Class names of the denoiser's blocks whose Linears (and 1x1 convs) get LoRA layers (sd-scripts' default
    # set), and of those whose convolutions also do for LoCon or a conv_rank (``lora/targets.py``).
    lora_containers: tuple = ()
    conv_containers: tuple = ()
    # The network types (``lora/registry.py``) whose files the family's loaders (ComfyUI, the WebUI, diffusers)
    # are known to apply; ``check_network_type`` refuses the others before anything loads.
    network_types: tuple = ("lora",)

    # ------------------------------------------------------------ recognising the model

    def claims_checkpoint(self, keys: Collection[str]) -> bool:
        """Whether a single-file checkpoint with these tensor names is of this family."""
        return False

    def claims_diffusers_folder(self, index: Dict[str, Any], path: str) -> bool:
        """Whether a diffusers folder with this ``model_index.json`` is of this family."""
        return False

    # ------------------------------------------------------------ standalone engine

    # The standalone adapter's class as "package.module:Class" (see ``adapter_class``).
    standalone_adapter = ""

    def open_standalone(self, path: str, **options) -> "DiffusionAdapter":
        """The standalone adapter over the model at ``path`` (a local file or folder). ``options``: ``reference``
        (``base_model`` as given), ``cfg``, ``device``, ``dtype``, ``prediction_type``, ``model_name`` (a Hub
        name), ``on_download``, ``log``; see ``models/standalone.py``."""
        if not self.standalone_adapter:
            raise NotImplementedError(f"{self.label} cannot be trained by the standalone engine yet.")
        return adapter_class(self.standalone_adapter)(path, self, **options)

    def objective(
        self, prediction_type: str, alphas_cumprod: Optional["torch.Tensor"], cfg=None
    ) -> "TrainingObjective":
        """The training objective: how to noise a sample, what the model must predict, the loss weights."""
        raise NotImplementedError

    def default_prediction_type(self, keys: Collection[str] = ()) -> str:
        return "epsilon"

    # ------------------------------------------------------------ the LoRA file

    def check_network_type(self, network_type: str, conv_rank: Optional[int] = None) -> None:
        """Raise ``ConfigError`` naming the option when the family cannot train or export ``network_type``
        (or convolution layers, which only UNet families have)."""
        from lora_trainer.errors import ConfigError

        if network_type not in self.network_types:
            raise ConfigError(
                f"network_type: {network_type!r} is not supported for {self.label} yet (supported: "
                f"{', '.join(self.network_types)}): its LoRA files are written in the form "
                f"{self.label}'s loaders read, which has no {network_type} layers. Set network_type: lora."
            )
        if conv_rank is not None and not self.conv_containers:
            raise ConfigError(f"conv_rank: {self.label} has no convolution layers that LoRA trains; remove conv_rank.")

    def text_lora_prefix(self, index: int) -> str:
        """``lora_te_`` / ``lora_te1_``... for the ``index``-th text encoder."""
        return self.text_lora_prefixes[index]

    def to_lora_file(self, tensors: Dict[str, Any]) -> Dict[str, Any]:
        """The network's kohya-named tensors (``<lora_unet_...>.lora_down.weight``...) under the names the
        family's file uses; kohya families keep them as they are."""
        return tensors

    def from_lora_file(self, tensors: Dict[str, Any]) -> Dict[str, Any]:
        """The inverse of ``to_lora_file``: a file's tensors under the network's kohya names."""
        return tensors

    def base_model_version(self, prediction_type: str) -> str:
        """``ss_base_model_version`` as sd-scripts writes it (A1111 and SD.Next filter on it)."""
        raise NotImplementedError

    def is_v2(self) -> bool:
        """``ss_v2``: A1111 and Forge classify a LoRA as SD2 by it."""
        return False

    def modelspec_architecture(self, prediction_type: str) -> str:
        """``modelspec.architecture`` without the ``/lora`` suffix (sd-scripts' ``determine_architecture``)."""
        raise NotImplementedError

    def modelspec_implementation(self) -> str:
        """``modelspec.implementation`` of a LoRA (sd-scripts' ``determine_implementation``)."""
        return IMPL_DIFFUSERS

    def modelspec_prediction_type(self, prediction_type: str) -> Optional[str]:
        """``modelspec.prediction_type``: ``epsilon`` or ``v``; None where the family has none (flow matching)."""
        return "v" if prediction_type == "v_prediction" else "epsilon"

    def extra_metadata(self, cfg, prediction_type: str) -> Dict[str, Any]:
        """Family-specific ``ss_*`` keys (e.g. Flux's guidance and timestep sampling)."""
        return {}

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class FlowMatchingFamily(ModelFamily):
    """A family trained with rectified flow (Flux, Z-Image): sd-scripts' ``timestep_sampling`` options choose
    the noise levels (``train/objectives.py``); there is no DDPM schedule or eps/v choice."""

    def objective(self, prediction_type: str, alphas_cumprod=None, cfg=None) -> "TrainingObjective":
        from lora_trainer.train.objectives import FlowMatchingObjective

        return FlowMatchingObjective(
            getattr(cfg, "timestep_sampling", "sigmoid"),
            sigmoid_scale=getattr(cfg, "sigmoid_scale", 1.0),
            shift=getattr(cfg, "discrete_flow_shift", 3.0),
            noise_offset=getattr(cfg, "noise_offset", 0.0) or 0.0,
        )

    def default_prediction_type(self, keys: Collection[str] = ()) -> str:
        return "flow"
