"""Training inside the host (the WebUI's already-loaded ldm model) against the standalone CLI, same checkpoint.

Two measured subprocesses, one after the other, on the random full-size SD1.5 checkpoint and the 8-image
dataset that bench_train.py builds under --workdir (built here too if missing):

  host        .venv-host (the WebUI's pins and the real ``ldm`` package). Builds the standard SD1.5 ldm
              ``LatentDiffusion`` (v1-inference config: UNet 320/[1,2,4,4], FrozenCLIPEmbedder over a local
              ViT-L/14 text-model folder, the KL VAE), loads the checkpoint into it in fp32 (the WebUI on CPU with
              --no-half) -- "the WebUI already holds the model" -- then, as pressing Train does, calls
              ``train_image`` with ``LdmHostAdapter`` and ``LocalRuntime(cpu)``. Measured from the moment of
              Train: seconds to the first finished step (a callback's ``on_step_end``), the extra peak memory
              (VmHWM during training, reset through /proc/self/clear_refs, or VmRSS sampled every 50 ms where
              that is refused, minus VmRSS just before Train), and the median seconds per step.
  standalone  python train.py --config ... in this (main) venv, measured as bench_train.py does: seconds from
              process start to the first step (TensorBoard event times), peak RSS of the whole process (GNU
              time), median seconds per step. cache_to_disk is off, so it encodes the images and captions
              in memory exactly as the host run does.

Both runs: batch 1, rank 8, --steps steps, the same thread count (all cores). The ratios printed are
host Train->first step / CLI start->first step, host extra peak memory / CLI peak RSS, host s/step / CLI s/step.

--host-attention picks the host's attention: ``ldm`` (default) leaves ldm's einsum CrossAttention in place, which
the adapter runs through torch's SDPA for the run (``hosts/host_attention.py``; the product's behaviour);
``ldm-kept`` passes ``fast_attention=False``, so the einsum attention runs (the behaviour before the swap);
``sdpa`` patches the class to SDPA first, as the WebUI's default "sdp" cross-attention optimisation does (the
adapter then leaves it alone); ``all`` runs the three.

    .venv/bin/python bench/bench_host.py --workdir /tmp/lora_bench [--steps 6 --host-attention ldm|ldm-kept|sdpa|all]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_PYTHON = os.path.join(REPO, ".venv-host", "bin", "python")
RESULT_PREFIX = "BENCH_HOST_RESULT "

# ldm's configs/stable-diffusion/v1-inference.yaml, as a dict (image_size 64 = 512 px; training uses any size).
SD15_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": True,
    "legacy": False,
}
SD15_VAE = {
    "embed_dim": 4,
    "monitor": "val/rec_loss",
    "lossconfig": {"target": "torch.nn.Identity"},
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}
VIT_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


def sd15_ldm_config(clip_folder: str) -> dict:
    return {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "num_timesteps_cond": 1,
            "log_every_t": 200,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": 64,
            "channels": 4,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema",
            "scale_factor": 0.18215,
            "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": SD15_UNET},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": SD15_VAE},
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"version": clip_folder, "device": "cpu"},
            },
        },
    }


def train_settings(workdir: str, run_name: str, steps: int, resolution: int, rank: int) -> dict:
    """The engine config both runs use; each run gets its own output folder (and encodes in memory)."""
    return {
        "train_data_dir": os.path.join(workdir, "data"),
        "base_model": os.path.join(workdir, "sd15_random.safetensors"),
        "output_dir": os.path.join(workdir, "host_bench", run_name),
        "resolution": resolution,
        "batch_size": 1,
        "lora_rank": rank,
        "max_train_steps": steps,
        "learning_rate": 1e-4,
        "cache_to_disk": False,
        "save_state": False,
    }


def median_step_seconds(step_times: list, warmup: int) -> float:
    """Median gap between finished steps, leaving out the first ``warmup`` steps (as bench_train.py does)."""
    durations = [b - a for a, b in zip(step_times, step_times[1:])][warmup - 1 :]
    return statistics.median(durations)


# ---------------------------------------------------------------- host side (runs under .venv-host)


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemoryDuringTraining:
    """Peak RSS from now on: the kernel's high-water mark after resetting it (``5`` > clear_refs), else the
    largest VmRSS seen by a thread sampling every 50 ms."""

    def __init__(self):
        self.method = "VmHWM after clear_refs"
        self.sampled_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = None
        before = proc_status_mb("VmHWM")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            reset = proc_status_mb("VmHWM") < before or before <= proc_status_mb("VmRSS") + 1
        except OSError:
            reset = False
        if not reset:
            self.method = "VmRSS sampled every 50 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled_peak_mb = max(self.sampled_peak_mb, proc_status_mb("VmRSS"))
            self._stop.wait(0.05)

    def stop(self) -> float:
        if self._thread is None:
            return proc_status_mb("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self.sampled_peak_mb, proc_status_mb("VmRSS"))


def write_vit_l_text_folder(folder: str) -> str:
    """A transformers CLIPTextModel (ViT-L/14 text config, random weights) + tokenizer folder for ldm's
    FrozenCLIPEmbedder(version=folder); the checkpoint's own text-encoder weights replace these on load."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.tokenizer import write_clip_tokenizer_files

    if not os.path.isfile(os.path.join(folder, "config.json")):
        write_clip_tokenizer_files(folder)
        CLIPTextModel(CLIPTextConfig(**VIT_L_TEXT)).save_pretrained(folder)
    return folder


def use_sdpa_in_ldm_attention() -> None:
    """Replace ldm CrossAttention's einsum/softmax/einsum with one fused scaled_dot_product_attention call."""
    import torch.nn.functional as F
    from ldm.modules.attention import CrossAttention

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        batch, heads = x.shape[0], self.heads
        q, k, v = (
            t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]))

    CrossAttention.forward = forward


def host_worker(args) -> None:
    """Build and load the host model, then press Train; prints one result line."""
    sys.path[:0] = [REPO, os.path.join(REPO, "tests", "host")]
    import torch
    from conftest import apply_webui_lightning_shim
    from ldm_tiny import load_single_file

    apply_webui_lightning_shim()
    from ldm.util import instantiate_from_config

    from lora_trainer.config import config_from_dict
    from lora_trainer.hosts.ldm_adapter import LdmHostAdapter
    from lora_trainer.train.callbacks import TrainingCallback
    from lora_trainer.train.image_trainer import train_image
    from lora_trainer.train.runtime import LocalRuntime, default_thread_count

    torch.set_num_threads(default_thread_count())  # what the CLI's runtime sets
    if args.host_attention == "sdpa":
        use_sdpa_in_ldm_attention()
    settings = train_settings(args.workdir, f"host_{args.host_attention}", args.steps, args.resolution, args.rank)
    shutil.rmtree(settings["output_dir"], ignore_errors=True)
    clip_folder = write_vit_l_text_folder(os.path.join(args.workdir, "host_bench", "clip_vit_l_text"))
    load_started = time.time()
    model = instantiate_from_config(sd15_ldm_config(clip_folder))
    load_single_file(model, settings["base_model"])
    model = model.eval()
    load_s = time.time() - load_started

    class StepTimes(TrainingCallback):
        def __init__(self):
            self.times = []
            self.loop_started = None

        def on_train_start(self, total_steps, start_step, summary):
            self.loop_started = time.time()  # encodings done, LoRA attached: the loop begins

        def on_step_end(self, info):
            self.times.append(time.time())

    step_times = StepTimes()
    cfg = config_from_dict(settings)
    rss_before_train_mb = proc_status_mb("VmRSS")
    peak = PeakMemoryDuringTraining()
    train_pressed = time.time()
    fast_attention = args.host_attention != "ldm-kept"
    with LdmHostAdapter(
        model, device=torch.device("cpu"), model_name="sd15_random", fast_attention=fast_attention
    ) as adapter:
        result = train_image(
            cfg, callbacks=[step_times], runtime=LocalRuntime(torch.device("cpu")), adapter=adapter, log=lambda *a: None
        )
    peak_during_training_mb = peak.stop()
    if result.status != "finished":
        raise SystemExit(f"host training did not finish: {result.status} {result.message}")
    print(
        RESULT_PREFIX
        + json.dumps(
            {
                "load_s": load_s,
                "rss_before_train_mb": rss_before_train_mb,
                "peak_during_training_mb": peak_during_training_mb,
                "peak_method": peak.method,
                "first_step_s": step_times.times[0] - train_pressed,
                "setup_s": step_times.loop_started - train_pressed,
                "step_s": median_step_seconds(step_times.times, args.warmup),
                "step_times": step_times.times,
                "train_pressed": train_pressed,
                "process_peak_mb": proc_status_mb("VmHWM"),
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


# ---------------------------------------------------------------- driver (main venv)


def run_host(args, attention: str) -> dict:
    command = [
        HOST_PYTHON,
        os.path.abspath(__file__),
        "--host-worker",
        "--host-attention",
        attention,
        "--workdir",
        args.workdir,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--resolution",
        str(args.resolution),
        "--rank",
        str(args.rank),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"host run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def run_standalone(args) -> dict:
    import yaml
    from bench_train import tensorboard_step_times, timed

    settings = train_settings(args.workdir, "standalone", args.steps, args.resolution, args.rank)
    shutil.rmtree(settings["output_dir"], ignore_errors=True)
    config_path = os.path.join(args.workdir, "host_bench", "standalone.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(settings, fh)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    _, peak_rss_mb, started = timed([sys.executable, os.path.join(REPO, "train.py"), "--config", config_path], env)
    step_times = tensorboard_step_times(os.path.join(settings["output_dir"], "logs"))
    return {
        "first_step_s": step_times[0] - started,
        "peak_rss_mb": peak_rss_mb,
        "step_s": median_step_seconds(step_times, args.warmup),
        "step_times": step_times,
    }


def ensure_inputs(workdir: str) -> None:
    from bench_train import build_checkpoint, make_images

    checkpoint = os.path.join(workdir, "sd15_random.safetensors")
    if not os.path.exists(checkpoint):
        print("building a random full-size SD1.5 checkpoint ...", flush=True)
        build_checkpoint(checkpoint)
    if not os.path.isdir(os.path.join(workdir, "data")):
        make_images(os.path.join(workdir, "data"), 8)


def print_report(args, hosts: dict, cli: dict, load_averages: list) -> None:
    print(
        f"\nSD1.5 architecture, random weights, fp32 on CPU ({hosts[next(iter(hosts))]['threads']} threads), "
        f"{args.resolution} px, batch 1, 8 images, rank {args.rank}, {args.steps} steps, median s/step after "
        f"{args.warmup} warm-up steps, encodings in memory (no disk cache)"
    )
    print(f"{'run':31s} {'to 1st step s':>14s} {'memory MB':>10s} {'s/step':>8s}   memory means")
    for attention, host in hosts.items():
        extra = host["peak_during_training_mb"] - host["rss_before_train_mb"]
        print(
            f"{'host, ' + attention + ' attention':31s} {host['first_step_s']:14.1f} {extra:10.0f} "
            f"{host['step_s']:8.2f}   extra peak during training (model held: "
            f"{host['rss_before_train_mb']:.0f} MB before Train; {host['peak_method']})"
        )
    print(
        f"{'standalone CLI':31s} {cli['first_step_s']:14.1f} {cli['peak_rss_mb']:10.0f} {cli['step_s']:8.2f}   "
        "peak RSS of the whole process"
    )
    for attention, host in hosts.items():
        extra = host["peak_during_training_mb"] - host["rss_before_train_mb"]
        print(
            f"ratios host ({attention}) / CLI: Train->first step {host['first_step_s'] / cli['first_step_s']:.3f}, "
            f"extra peak memory / CLI peak {extra / cli['peak_rss_mb']:.3f}, "
            f"s/step {host['step_s'] / cli['step_s']:.3f}"
        )
    for name, run in [*((f"host, {a} attention", h) for a, h in hosts.items()), ("standalone CLI", cli)]:
        gaps = [b - a for a, b in zip(run["step_times"], run["step_times"][1:])]
        setup = f"Train->training loop {run['setup_s']:.1f} s, " if "setup_s" in run else ""
        print(f"{name}: {setup}seconds between steps " + " ".join(f"{g:.2f}" for g in gaps))
    print("load average (1 min) before/after each run: " + ", ".join(load_averages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lora_bench")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--host-attention",
        choices=("ldm", "ldm-kept", "sdpa", "all"),
        default="ldm",
        help="ldm: the package's own attention (the adapter swaps it for SDPA); ldm-kept: the adapter keeps it; "
        "sdpa: the host already runs torch's fused attention",
    )
    parser.add_argument("--host-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host_worker:
        host_worker(args)
        return
    sys.path.insert(0, os.path.join(REPO, "bench"))
    ensure_inputs(args.workdir)
    os.makedirs(os.path.join(args.workdir, "host_bench"), exist_ok=True)
    load_averages = []

    def note_load(label: str) -> None:
        load_averages.append(f"{label} {os.getloadavg()[0]:.2f}")

    hosts = {}
    for attention in ("ldm", "ldm-kept", "sdpa") if args.host_attention == "all" else (args.host_attention,):
        note_load(f"host {attention} start")
        print(f"host run ({attention} attention) ...", flush=True)
        hosts[attention] = run_host(args, attention)
        note_load("end")
    note_load("CLI start")
    print("standalone CLI run ...", flush=True)
    cli = run_standalone(args)
    note_load("end")
    print_report(args, hosts, cli, load_averages)


if __name__ == "__main__":
    main()
