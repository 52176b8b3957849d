"""The captioner interface: a batch of RGB images in, one caption string per image out."""

from __future__ import annotations

import abc
from typing import Callable, List, Sequence

from PIL import Image

from lora_trainer.errors import ModelLoadError


class CaptionerUnavailable(ModelLoadError):
    """A captioner cannot be used here: its weights are not on disk, or a package it needs is missing."""


class Captioner(abc.ABC):
    """Captions images. Implementations keep their model loaded between calls; call ``close`` to free it."""

    name: str = "captioner"

    @abc.abstractmethod
    def caption(self, images: Sequence[Image.Image]) -> List[str]:
        """One caption per image, in order. Images are RGB; a batch may hold a single image."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not every captioner holds a model
        """Release the model (GPU memory). The default holds nothing."""


class CallableCaptioner(Captioner):
    """A captioner backed by a function, e.g. a host application's interrogator.

    ``fn`` takes one image and returns its caption, or, with ``batched=True``, takes a list of images and
    returns a list of captions.
    """

    def __init__(self, fn: Callable, *, batched: bool = False, name: str = "callable") -> None:
        self._fn = fn
        self._batched = batched
        self.name = name

    def caption(self, images: Sequence[Image.Image]) -> List[str]:
        if not self._batched:
            return [str(self._fn(image)) for image in images]
        captions = [str(text) for text in self._fn(list(images))]
        if len(captions) != len(images):
            raise ValueError(f"captioner {self.name!r} returned {len(captions)} captions for {len(images)} images")
        return captions


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; any other value is returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
