"""The floor for the benchmarks: a bare PyTorch LoRA training loop on the same model and module set as ours.

A true lower bound for our trainer's step: everything that decides a step's speed is what our CLI uses at
its best -- the same UNet loaded the same way (SDPA attention processor, contiguous memory format, the base in
the same dtype), the same thread count, the same autocast/GradScaler for mixed precision, the same gradient
checkpointing, LoRA on the same modules, AdamW with torch's fused kernel and clip_grad_norm_ with foreach --
and nothing else: no dataset, captions, caches, callbacks or logging. Latents and text embeddings are random
tensors of the right shapes, made before the clock matters. Each step is noise -> UNet forward -> MSE ->
backward -> clip -> AdamW step.

Prints one JSON line per finished step (``time``: wall clock when it finished) and a last line with
``"done": true`` and the peak memory (``peak_vram_mb``: torch.cuda.max_memory_allocated on a GPU;
``peak_rss_mb``: the process's peak resident memory).

    python bench/floor_loop.py CHECKPOINT --steps 10 --resolution 256 --rank 8 [--device cuda
        --mixed-precision bf16 --gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

START = time.time()

import torch  # noqa: E402

from lora_trainer.lora.network import LoRANetwork  # noqa: E402
from lora_trainer.models.diffusers_adapter import DiffusersAdapter  # noqa: E402
from lora_trainer.train.runtime import PRECISION_DTYPES, default_thread_count  # noqa: E402

SAMPLES = 4  # distinct random inputs cycled through, as a small dataset would be


def fastest_adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel where it has one for these parameters (CPU, CUDA), else foreach."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", choices=tuple(PRECISION_DTYPES), default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(default_thread_count())  # what our runtime sets
    dtype = PRECISION_DTYPES[args.mixed_precision]
    adapter = DiffusersAdapter(args.checkpoint, device=device, dtype=dtype)
    adapter.load(unet=True, vae=False, text_encoders=False)
    unet = adapter.unet
    network = LoRANetwork(adapter.lora_targets(False), rank=args.rank, alpha=args.rank)
    network.to(device)
    network.attach()
    if args.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(False)
    params = list(network.parameters())
    optimizer = fastest_adamw(params, lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None

    g = torch.Generator(device=device).manual_seed(0)
    side = args.resolution // 8
    latents = torch.randn(SAMPLES, 4, side, side, generator=g, device=device)
    context = torch.randn(SAMPLES, 77, unet.config.cross_attention_dim, generator=g, device=device)
    extra = {}
    if adapter.family.size_conditioning:  # SDXL
        pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        pooled = torch.randn(SAMPLES, pooled_width, generator=g, device=device)
        size = float(args.resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device)
    ac = adapter.alphas_cumprod
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.mixed_precision != "no")
    for step in range(args.steps):
        i = step % SAMPLES
        x0, ctx = latents[i : i + 1], context[i : i + 1]
        if adapter.family.size_conditioning:  # SDXL
            extra = {"added_cond_kwargs": {"text_embeds": pooled[i : i + 1], "time_ids": time_ids}}
        t = torch.randint(0, 1000, (1,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast:
            pred = unet(noisy, t, encoder_hidden_states=ctx, return_dict=False, **extra)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)  # waits for the device, as our loop does when it logs the loss
        print(json.dumps({"step": step + 1, "time": time.time(), "start": START, "loss": loss_value}), flush=True)
    vram = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"done": True, "start": START, "peak_vram_mb": vram, "peak_rss_mb": rss}), flush=True)


if __name__ == "__main__":
    main()
