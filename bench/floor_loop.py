"""The floor for bench_train.py: a bare PyTorch LoRA training loop on the same model and module set.

No dataset, no captions, no caches, no callbacks: latents and text embeddings are given (precomputed), and
each step is noise -> UNet forward -> MSE -> backward -> AdamW step. Prints one JSON line per finished step
with its wall-clock time, so the benchmark compares like with like.
"""

from __future__ import annotations

import json
import sys
import time

START = time.time()

import torch  # noqa: E402

from lora_trainer.lora.network import LoRANetwork  # noqa: E402
from lora_trainer.models.diffusers_adapter import DiffusersAdapter  # noqa: E402


def main(checkpoint: str, steps: int, resolution: int, rank: int) -> None:
    adapter = DiffusersAdapter(checkpoint, device=torch.device("cpu"))
    adapter.load(unet=True, vae=False, text_encoders=False)
    unet = adapter.unet
    network = LoRANetwork(adapter.lora_targets(False), rank=rank, alpha=rank)
    network.attach()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents = torch.randn(8, 4, side, side, generator=g)
    context = torch.randn(8, 77, unet.config.cross_attention_dim, generator=g)
    ac = adapter.alphas_cumprod
    for step in range(steps):
        x0, ctx = latents[step % 8 : step % 8 + 1], context[step % 8 : step % 8 + 1]
        t = torch.randint(0, 1000, (1,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(network.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(json.dumps({"step": step + 1, "time": time.time(), "start": START, "loss": float(loss)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
