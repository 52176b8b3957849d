"""The floor for bench_flux.py: a bare PyTorch flow-matching LoRA loop on the same Flux transformer file and
LoRA module set. Packed latents and text embeddings are given; each step is noise -> transformer -> MSE against
noise - x0 -> backward -> AdamW. Prints one JSON line per finished step with its wall-clock time.

    flux_floor_loop.py TRANSFORMER_FILE STEPS RESOLUTION RANK
"""

from __future__ import annotations

import json
import sys
import time

START = time.time()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lora_trainer.lora.network import LoRANetwork  # noqa: E402
from lora_trainer.lora.targets import find_targets  # noqa: E402
from lora_trainer.models.families.flux import LORA_CONTAINERS  # noqa: E402
from lora_trainer.models.flux.transformer import FluxParams, FluxTransformer, image_ids, pack_latents  # noqa: E402


def main(path: str, steps: int, resolution: int, rank: int) -> None:
    state = load_file(path)
    params = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = FluxTransformer(params)
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False).eval()
    del state
    targets = [("lora_unet_" + p.replace(".", "_"), m) for p, m in find_targets(model, LORA_CONTAINERS)]
    network = LoRANetwork(targets, rank=rank, alpha=rank)
    network.attach()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents = torch.randn(4, 16, side, side, generator=g)
    txt = torch.randn(4, 256, params.context_in_dim, generator=g)
    pooled = torch.randn(4, params.vec_in_dim, generator=g)
    ids, txt_ids = image_ids(1, side, side), torch.zeros(1, 256, 3)
    guidance = torch.ones(1) if params.guidance_embed else None
    for step in range(steps):
        i = step % 4
        x0 = latents[i : i + 1]
        t = torch.sigmoid(torch.randn((1,), generator=g))
        noise = torch.randn(x0.shape, generator=g)
        noisy = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = model(pack_latents(noisy), ids, txt[i : i + 1], txt_ids, t, pooled[i : i + 1], guidance)
        loss = torch.nn.functional.mse_loss(pred.float(), pack_latents(noise - x0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(network.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(json.dumps({"step": step + 1, "time": time.time(), "start": START, "loss": float(loss)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
