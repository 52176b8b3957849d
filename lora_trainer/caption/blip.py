"""BLIP captioning with transformers' ``BlipForConditionalGeneration``, from a local folder or the Hub (the
default repository is downloaded into the Hugging Face cache on first use)."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from PIL import Image

from lora_trainer.caption.base import Captioner, CaptionerUnavailable, resolve_device
from lora_trainer.caption.locate import WeightsSpec, resolve_weights_folder
from lora_trainer.hub.progress import DownloadCallback

BLIP_WEIGHTS = WeightsSpec(
    label="BLIP",
    repo_id="Salesforce/blip-image-captioning-base",
    required=(
        ("config.json",),
        ("preprocessor_config.json", "processor_config.json"),
        ("tokenizer.json", "vocab.txt"),
        ("model.safetensors", "pytorch_model.bin"),
    ),
    suggested_folder="models/caption/blip",
    # What BlipProcessor also reads when present: tokenizer settings and special tokens.
    optional=(
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "tokenizer.json",
        "processor_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    ),
    name="blip",
)


class BlipCaptioner(Captioner):
    """Greedy (or beam) BLIP captions for a batch of images."""

    name = "blip"

    def __init__(
        self, model, processor, device: str, *, max_new_tokens: int = 40, num_beams: int = 1, prompt: str = ""
    ) -> None:
        self._model = model
        self._processor = processor
        self._device = device
        self._max_new_tokens = max_new_tokens
        self._num_beams = num_beams
        self._prompt = prompt

    def caption(self, images: Sequence[Image.Image]) -> List[str]:
        import torch

        if not images:
            return []
        kwargs = {"text": [self._prompt] * len(images)} if self._prompt else {}
        inputs = self._processor(images=list(images), return_tensors="pt", **kwargs)
        dtype = next(self._model.parameters()).dtype
        inputs = {
            key: value.to(self._device, dtype=dtype) if key == "pixel_values" else value.to(self._device)
            for key, value in inputs.items()
        }
        with torch.inference_mode():
            tokens = self._model.generate(**inputs, max_new_tokens=self._max_new_tokens, num_beams=self._num_beams)
        return [" ".join(text.split()) for text in self._processor.batch_decode(tokens, skip_special_tokens=True)]

    def close(self) -> None:
        self._model = None


def load_blip(
    model_path: Optional[str] = None,
    device: str = "auto",
    *,
    max_new_tokens: int = 40,
    num_beams: int = 1,
    prompt: str = "",
    on_download: Optional[DownloadCallback] = None,
    log: Optional[Callable[[str], None]] = None,
) -> BlipCaptioner:
    """Load BLIP from ``model_path`` (a folder saved with ``save_pretrained``, or a Hub repository), or from
    the default repository (downloaded on first use; ``on_download`` sees the progress)."""
    folder = resolve_weights_folder(BLIP_WEIGHTS, model_path, on_download=on_download, log=log)
    try:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor
    except ImportError as exc:
        raise CaptionerUnavailable(
            f"BLIP captioning needs transformers ({exc}); install it with `pip install lora-trainer[caption]`."
        ) from None
    device = resolve_device(device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise CaptionerUnavailable(f"cannot load BLIP from {folder}: {exc}") from None
    model.to(device).eval()
    return BlipCaptioner(model, processor, device, max_new_tokens=max_new_tokens, num_beams=num_beams, prompt=prompt)
