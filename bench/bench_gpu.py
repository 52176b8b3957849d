"""GPU benchmark: our trainer against the same-run floor, SD1.5 at 512 px and SDXL at 1024 px, batch 1.

One short command on a machine with a CUDA GPU and nothing else reachable; everything is built here from
random weights (full-size SD1.5 / SDXL single-file checkpoints, a few generated images):

    python bench/bench_gpu.py [--precision bf16|fp16] [--steps 12] [--models sd15,sdxl] [--budget-s 480]

For each model, three subprocesses, each under its own timeout:
  build  random weights at the real architecture (initialised on the GPU), written as an fp16 .safetensors
  floor  bench/floor_loop.py: the bare PyTorch LoRA loop with our CLI's settings (attention, precision,
         gradient checkpointing, fused AdamW), random latents; no data, no encoders
  ours   our trainer as ``train.py`` runs it (run_training with accelerate's runtime) on a cold start: dataset
         scan, VAE and text encoders loaded, images and captions encoded, encoders freed, UNet loaded, trained
(and bench/bench_encoding.py on the same checkpoint: encoding speed, and the error of bf16/fp16 against fp32),
and prints one table: median s/step after the warm-up steps, x floor, seconds from process start to the first
finished step, peak VRAM (torch.cuda.max_memory_allocated over the whole process) against the goals (SD1.5
under 5 GB, SDXL under 12 GB). Rows are printed as soon as each run ends, and the table at the end shows
whatever finished: a phase that fails or runs past its timeout is reported as such, with the steps it did.

``--tiny`` is the reduced mode the test suite runs on the CPU (tiny models of the same families at 64 px), so
the script cannot rot between the days a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

START = time.time()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "bench")]

RESULT = "BENCH_GPU "  # prefix of the workers' JSON lines

# The SD1.5 UNet is bench_train.py's (the CPU benchmark trains the same architecture).
from bench_train import SD15_UNET  # noqa: E402

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def vae_config(scaling: float) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        scaling_factor=scaling,
    )


def clip_text_config(hidden: int, layers: int, act: str, projection: Optional[int] = None) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


@dataclass(frozen=True)
class ModelCase:
    name: str
    arch: str  # tests/support/tiny_models.py's family name
    resolution: int
    vram_goal_gb: float
    gradient_checkpointing: bool  # what a user of this model on a consumer GPU runs with


CASES = {
    "sd15": ModelCase("sd15", "sd1", 512, 5.0, False),
    "sdxl": ModelCase("sdxl", "sdxl", 1024, 12.0, True),
}
TINY_RESOLUTION = 64


# ---------------------------------------------------------------- workers (each in its own process)


def emit(**values) -> None:
    print(RESULT + json.dumps(values), flush=True)


def peak_memory_mb(device) -> Dict[str, Optional[float]]:
    import torch

    vram = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_vram_mb": vram, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def build_inputs(name: str, tiny: bool, device_name: str, checkpoint: str, data: str) -> None:
    """Write the random checkpoint (fp16 single file) and the image folder."""
    import torch
    from safetensors.torch import save_file
    from support.tiny_models import (
        TinyPipelineParts,
        _perturb_zero_outputs,
        build_tiny,
        make_image_folder,
        to_single_file_state,
    )

    case = CASES[name]
    device = torch.device(device_name)
    if tiny:
        parts = build_tiny(case.arch)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(0)
        with device:  # initialising ~3 B parameters is seconds on a GPU, minutes on a CPU
            if case.arch == "sdxl":
                unet = UNet2DConditionModel(**SDXL_UNET)
                vae = AutoencoderKL(**vae_config(0.13025))
                encoders = [
                    CLIPTextModel(CLIPTextConfig(**clip_text_config(768, 12, "quick_gelu"))),
                    CLIPTextModelWithProjection(CLIPTextConfig(**clip_text_config(1280, 32, "gelu", 1280))),
                ]
            else:
                unet = UNet2DConditionModel(**SD15_UNET)
                vae = AutoencoderKL(**vae_config(0.18215))
                encoders = [CLIPTextModel(CLIPTextConfig(**clip_text_config(768, 12, "quick_gelu")))]
        _perturb_zero_outputs(unet, 1)
        parts = TinyPipelineParts(case.arch, unet, vae, encoders, "epsilon")
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in to_single_file_state(parts).items()}
    del parts
    save_file(state, checkpoint)
    size = TINY_RESOLUTION if tiny else case.resolution
    make_image_folder(data, count=4, size=(size, size), captions=[f"photo {i}, bench style" for i in range(4)])


def ours_worker(args) -> None:
    """Our trainer on a cold start, as ``train.py --config`` runs it; one line per finished step."""
    import torch
    import yaml

    from lora_trainer.config import config_from_dict
    from lora_trainer.train.callbacks import TrainingCallback
    from lora_trainer.train.run import run_training

    with open(args.config, encoding="utf-8") as fh:
        cfg = config_from_dict(yaml.safe_load(fh))

    class Probe(TrainingCallback):
        def on_train_start(self, total_steps, start_step, summary):
            emit(train_start=time.time())

        def on_step_end(self, info):
            emit(step=info.step, time=time.time(), loss=info.loss)

    result = run_training(cfg, callbacks=[Probe()])
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    emit(done=True, status=result.status, message=result.message, **peak_memory_mb(device))


# ---------------------------------------------------------------- driver


@dataclass
class PhaseResult:
    ok: bool
    note: str
    lines: List[dict] = field(default_factory=list)
    started: float = 0.0
    seconds: float = 0.0


def run_phase(command: List[str], timeout_s: float, env: dict, parse) -> PhaseResult:
    """Run ``command``, collecting the stdout lines ``parse`` accepts (as they come, so a run killed at
    ``timeout_s`` seconds still reports the steps it finished); stderr goes to a log file."""
    started = time.time()
    log_path = os.path.join(env["BENCH_GPU_LOGS"], f"{int(started * 1000)}.log")
    lines: List[dict] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True)

        def read() -> None:
            for line in proc.stdout:
                value = parse(line)
                if value is not None:
                    lines.append(value)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(timeout=10)
            return PhaseResult(False, f"timeout after {timeout_s:.0f} s", list(lines), started, time.time() - started)
        reader.join(timeout=10)
    if proc.returncode != 0:
        with open(log_path) as fh:
            tail = fh.read()[-2000:]
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        note = "out of memory" if "OutOfMemoryError" in tail else f"exit {proc.returncode}: {last[:120]}"
        return PhaseResult(False, note, list(lines), started, time.time() - started)
    return PhaseResult(True, "", list(lines), started, time.time() - started)


def result_line(line: str) -> Optional[dict]:
    return json.loads(line[len(RESULT) :]) if line.startswith(RESULT) else None


def floor_line(line: str) -> Optional[dict]:
    return json.loads(line) if line.startswith("{") else None


@dataclass
class Row:
    model: str
    run: str
    precision: str
    step_s: Optional[float] = None
    first_step_s: Optional[float] = None
    peak_vram_mb: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    steps_done: int = 0
    note: str = ""


def summarise(row: Row, phase: PhaseResult, warmup: int) -> Row:
    steps = [line["time"] for line in phase.lines if "step" in line]
    done = next((line for line in phase.lines if line.get("done")), {})
    row.steps_done = len(steps)
    if steps:
        row.first_step_s = steps[0] - phase.started
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    usable = gaps[max(0, warmup - 1) :] or gaps
    if usable:
        row.step_s = statistics.median(usable)
    row.peak_vram_mb = done.get("peak_vram_mb")
    row.peak_rss_mb = done.get("peak_rss_mb")
    notes = [phase.note] if phase.note else []
    if done.get("status") not in (None, "finished"):
        notes.append(f"{done['status']}: {done.get('message', '')[:80]}")
    row.note = "; ".join(notes)
    return row


def fmt(value: Optional[float], pattern: str) -> str:
    """``value`` formatted, or "-" right-aligned to the pattern's width."""
    if value is not None:
        return format(value, pattern)
    width = pattern.lstrip("+").split(".")[0]
    return "-".rjust(int(width) if width.isdigit() else 1)


def print_table(rows: List[Row], cases: Dict[str, ModelCase], tiny: bool) -> None:
    floors = {r.model: r for r in rows if r.run == "floor"}
    print(
        f"\n{'model':6s} {'run':6s} {'prec':5s} {'s/step':>8s} {'x floor':>8s} {'start->1st s':>13s} "
        f"{'+s vs floor':>12s} {'peak VRAM GB':>13s} {'goal':>9s} {'peak RSS GB':>12s}  note"
    )
    for r in rows:
        floor = floors.get(r.model)
        ratio = r.step_s / floor.step_s if r.step_s and floor and floor.step_s else None
        extra = r.first_step_s - floor.first_step_s if r.first_step_s and floor and floor.first_step_s else None
        vram = r.peak_vram_mb / 1024 if r.peak_vram_mb is not None else None
        goal = cases[r.model].vram_goal_gb
        verdict = "-" if vram is None else (f"<{goal:g} ok" if vram < goal else f">{goal:g} NO")
        rss = r.peak_rss_mb / 1024 if r.peak_rss_mb is not None else None
        print(
            f"{r.model:6s} {r.run:6s} {r.precision:5s} {fmt(r.step_s, '8.3f')} {fmt(ratio, '8.3f')} "
            f"{fmt(r.first_step_s, '13.1f')} {fmt(extra, '+12.1f')} {fmt(vram, '13.2f')} {verdict:>9s} "
            f"{fmt(rss, '12.2f')}  {r.note or ''}{' (' + str(r.steps_done) + ' steps)' if r.note else ''}",
            flush=True,
        )
    if tiny:
        print("(--tiny: tiny models on the CPU; the numbers only show that the script works)")


def train_config(args, case: ModelCase, checkpoint: str, data: str, output: str, precision: str) -> dict:
    return {
        "train_data_dir": data,
        "base_model": checkpoint,
        "output_dir": output,
        "resolution": TINY_RESOLUTION if args.tiny else case.resolution,
        "batch_size": 1,
        "lora_rank": args.rank,
        "max_train_steps": args.steps,
        "learning_rate": 1e-4,
        "mixed_precision": precision,
        "gradient_checkpointing": case.gradient_checkpointing,
        "cache_to_disk": False,  # a cold start every time: the encoders load and encode
        "save_state": False,
    }


def driver(args) -> int:
    import yaml

    cases = {name: CASES[name] for name in args.models.split(",")}
    device = args.device
    precision = args.precision
    if device == "auto" or precision == "auto":
        import torch

        has_cuda = torch.cuda.is_available()
        if device == "auto":
            device = "cuda" if has_cuda and not args.tiny else "cpu"
        if precision == "auto":
            from lora_trainer.models.precision import cpu_has_native_bf16

            if device == "cpu":  # bf16 is emulated (slow) on CPUs without native support
                precision = "bf16" if cpu_has_native_bf16() else "no"
            else:
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device == "cuda":
            print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    os.makedirs(args.workdir, exist_ok=True)
    logs = os.path.join(args.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=REPO, BENCH_GPU_LOGS=logs)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would otherwise pick a GPU for "ours"
    deadline = START + args.budget_s
    me = [sys.executable, os.path.abspath(__file__)]
    common = ["--device", device, "--workdir", args.workdir] + (["--tiny"] if args.tiny else [])
    rows: List[Row] = []
    print(
        f"{'tiny models, ' if args.tiny else ''}batch 1, rank {args.rank}, {args.steps} steps, median s/step after "
        f"{args.warmup} warm-up steps; budget {args.budget_s:.0f} s, logs in {logs}",
        flush=True,
    )
    for name, case in cases.items():
        checkpoint = os.path.join(args.workdir, f"{name}{'_tiny' if args.tiny else ''}.safetensors")
        data = os.path.join(args.workdir, f"data_{name}{'_tiny' if args.tiny else ''}")

        def phase_timeout() -> float:
            return min(args.phase_timeout_s, deadline - time.time())

        if not os.path.isfile(checkpoint):
            if phase_timeout() <= 1:
                rows.append(Row(name, "build", precision, note="no time left"))
                break
            shutil.rmtree(data, ignore_errors=True)
            if args.tiny:  # seconds: no process of its own (the test suite runs this mode)
                started = time.time()
                build_inputs(name, True, device, checkpoint + ".tmp", data)
                build = PhaseResult(True, "", [], started, time.time() - started)
            else:
                build = run_phase(
                    [*me, "--worker", "build", "--model", name, "--checkpoint", checkpoint + ".tmp", "--data", data]
                    + common,
                    phase_timeout(),
                    env,
                    result_line,
                )
            if not build.ok:
                rows.append(Row(name, "build", precision, note=build.note))
                print(f"{name}: building the checkpoint failed ({build.note})", flush=True)
                continue
            os.replace(checkpoint + ".tmp", checkpoint)
            print(f"{name}: built the random checkpoint in {build.seconds:.0f} s", flush=True)
        floor_cmd = [
            sys.executable,
            os.path.join(REPO, "bench", "floor_loop.py"),
            checkpoint,
            f"--steps={args.steps}",
            f"--resolution={TINY_RESOLUTION if args.tiny else case.resolution}",
            f"--rank={args.rank}",
            f"--device={device}",
            f"--mixed-precision={precision}",
        ] + (["--gradient-checkpointing"] if case.gradient_checkpointing else [])
        output = os.path.join(args.workdir, f"out_{name}")
        shutil.rmtree(output, ignore_errors=True)
        config_path = os.path.join(args.workdir, f"{name}.yaml")
        with open(config_path, "w") as fh:
            yaml.safe_dump(train_config(args, case, checkpoint, data, output, precision), fh)
        ours_cmd = [*me, "--worker", "ours", "--model", name, "--config", config_path] + common
        if args.encoding and phase_timeout() > 1:
            encoding_cmd = [
                sys.executable,
                os.path.join(REPO, "bench", "bench_encoding.py"),
                f"--checkpoint={checkpoint}",
                f"--device={device}",
                "--images=4",
                f"--resolution={TINY_RESOLUTION if args.tiny else case.resolution}",
            ]
            encoding = run_phase(encoding_cmd, phase_timeout(), env, lambda line: line.rstrip("\n"))
            print("\n".join(encoding.lines) + (f"\n  encoding: {encoding.note}" if encoding.note else ""), flush=True)
        for run, command, parse in (("floor", floor_cmd, floor_line), ("ours", ours_cmd, result_line)):
            if phase_timeout() <= 1:
                rows.append(Row(name, run, precision, note="no time left"))
                continue
            row = summarise(Row(name, run, precision), run_phase(command, phase_timeout(), env, parse), args.warmup)
            rows.append(row)
            print_table([r for r in rows if r.model == name], cases, args.tiny)
    print_table(rows, cases, args.tiny)
    return 0 if all(not r.note for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "no"),
        default="auto",
        help="auto: bf16 where the GPU has it, else fp16; on a CPU fp32 (no) unless it has native bf16",
    )
    parser.add_argument("--device", default="auto", help="auto: cuda if available (cpu with --tiny)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=480, help="whole run; phases still running are stopped")
    parser.add_argument("--phase-timeout-s", type=float, default=240, help="each build/floor/ours run")
    parser.add_argument("--workdir", default="/tmp/lora_gpu_bench")
    parser.add_argument("--tiny", action="store_true", help="reduced mode: tiny models on the CPU (the test suite)")
    parser.add_argument(
        "--no-encoding",
        dest="encoding",
        action="store_false",
        help="skip the encoding phase (bench_encoding.py: batched vs one-at-a-time, bf16/fp16 error vs fp32)",
    )
    parser.add_argument("--worker", choices=("build", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "build":
        build_inputs(args.model, args.tiny, args.device, args.checkpoint, args.data)
        emit(done=True)
        return 0
    if args.worker == "ours":
        ours_worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
