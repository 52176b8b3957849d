"""Per-sample and per-pixel loss weights: regularisation images (prior_loss_weight) and loss masks.

As sd-scripts' ``train_network.process_batch`` applies them: the element-wise loss is multiplied by the mask
(resized to the loss's height and width by area averaging), averaged over everything but the batch (so a
half-masked image weighs half, it is not renormalised), then multiplied by each sample's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    """``sample``: (B,) weights; ``mask``: (B, 1, h, w) in [0, 1], any h and w (resized to the loss's)."""

    sample: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


def weighted_sample_losses(elementwise: torch.Tensor, weights: Optional[LossWeights]) -> torch.Tensor:
    """(B, C, H, W) element-wise losses -> (B,) weighted per-sample losses."""
    if weights is not None and weights.mask is not None:
        mask = weights.mask.to(elementwise.device, elementwise.dtype)
        if mask.shape[-2:] != elementwise.shape[-2:]:
            mask = F.interpolate(mask, size=elementwise.shape[-2:], mode="area")
        elementwise = elementwise * mask
    per_sample = elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
    if weights is not None and weights.sample is not None:
        per_sample = per_sample * weights.sample.to(per_sample.device, per_sample.dtype)
    return per_sample


def batch_loss_weights(dataset, samples: Sequence, flips: Sequence[bool]) -> Optional[LossWeights]:
    """A batch's weights from its ``ImageCaptionDataset`` samples: prior_loss_weight for regularisation
    images, each image's loss mask (flipped with the image; all ones for one without a mask in a batch with
    masks). None when nothing is weighted (the plain mean)."""
    sample = mask = None
    if dataset.has_reg:
        sample = torch.tensor([dataset.loss_weight(s.index) for s in samples], dtype=torch.float32)
    if dataset.any_mask:
        masks = [dataset.loss_mask(s.index, flip) for s, flip in zip(samples, flips)]
        present = [m for m in masks if m is not None]
        if present:
            mask = torch.stack([m if m is not None else torch.ones_like(present[0]) for m in masks])
    return None if sample is None and mask is None else LossWeights(sample, mask)
