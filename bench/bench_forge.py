"""Training inside Forge (its already-loaded model, trained in place) against the standalone CLI, same checkpoint.

The random full-size SD1.5 checkpoint and 8-image dataset of bench_train.py under --workdir (built if missing).
Two ways to get Forge's side, then the standalone CLI measured exactly as bench_host.py measures it:

  --standin   (CI-able) In this (main) venv: the Forge stand-in of the tests (tests/forge_standin.py, written
              from Forge Neo's code) builds Neo's SD1.5 engine at full size and loads the checkpoint into it the
              way Forge does (inference mode, Forge's Linear, in-place residual blocks, sigma-based KModel),
              "Forge already holds the model"; then, as pressing Train does, ``train_image`` with
              ``ForgeHostAdapter``. Measured from Train: seconds to the first finished step, extra peak memory
              (VmHWM reset via /proc/self/clear_refs, or VmRSS sampled, minus VmRSS before Train) and median
              s/step -- the same measurements as bench_host.py's host worker.
  --webui URL --pid PID
              A real running Forge (Neo) with this extension, e.g. started offline on CPU. The run is started
              through its REST API (POST /lora-trainer/v1/train) with the same settings; Train->first step is
              the time from the request to the first step the status reports (polled every 50 ms), the extra peak
              memory the WebUI process's VmHWM during the run (reset through /proc/PID/clear_refs) minus its VmRSS
              before the request. --auth user:password for an --api-auth WebUI. The checkpoint Forge has loaded
              must be --workdir's sd15_random.safetensors for the comparison to mean anything.

Both: batch 1, rank 8, --steps steps, the same thread count. Printed: the figures and the ratios
Forge Train->first step / CLI start->first step, Forge extra peak memory / CLI peak RSS, Forge s/step / CLI s/step.

    .venv/bin/python bench/bench_forge.py --workdir /tmp/lora_bench --standin [--steps 6]
    .venv/bin/python bench/bench_forge.py --workdir /tmp/lora_bench --webui http://127.0.0.1:7860 --pid 1234
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "bench"), os.path.join(REPO, "tests")]

from bench_host import (  # noqa: E402
    RESULT_PREFIX,
    PeakMemoryDuringTraining,
    ensure_inputs,
    median_step_seconds,
    proc_status_mb,
    run_standalone,
    train_settings,
)

POLL_S = 0.05


# ---------------------------------------------------------------- the stand-in (a worker process)


def standin_worker(args) -> None:
    import forge_standin
    import torch
    from forge_standin import MemoryManagement, attention_pytorch, load_forge_engine

    from lora_trainer.config import config_from_dict
    from lora_trainer.hosts.forge_adapter import ForgeHostAdapter
    from lora_trainer.train.callbacks import TrainingCallback
    from lora_trainer.train.image_trainer import train_image
    from lora_trainer.train.runtime import LocalRuntime, default_thread_count

    torch.set_num_threads(default_thread_count())
    settings = train_settings(args.workdir, "forge_standin", args.steps, args.resolution, args.rank)
    shutil.rmtree(settings["output_dir"], ignore_errors=True)
    load_started = time.time()
    engine = load_forge_engine(settings["base_model"], "sd15")
    load_s = time.time() - load_started

    class StepTimes(TrainingCallback):
        def __init__(self):
            self.times = []
            self.loop_started = None

        def on_train_start(self, total_steps, start_step, summary):
            self.loop_started = time.time()

        def on_step_end(self, info):
            self.times.append(time.time())

    step_times = StepTimes()
    memory = MemoryManagement()
    cfg = config_from_dict(settings)
    rss_before_train_mb = proc_status_mb("VmRSS")
    peak = PeakMemoryDuringTraining()
    train_pressed = time.time()
    attention = [(forge_standin, "attention_function", attention_pytorch)]
    with ForgeHostAdapter(engine, load_models=memory.load_models_gpu, attention_overrides=attention) as adapter:
        result = train_image(
            cfg, callbacks=[step_times], runtime=LocalRuntime(torch.device("cpu")), adapter=adapter, log=lambda *a: None
        )
    peak_during_training_mb = peak.stop()
    if result.status != "finished":
        raise SystemExit(f"training did not finish: {result.status} {result.message}")
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
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def run_standin(args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--standin-worker", "--workdir", args.workdir]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--resolution", str(args.resolution)]
    command += ["--rank", str(args.rank)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"stand-in run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


# ---------------------------------------------------------------- a real Forge, through its REST API


def _request(url: str, auth: str, body: dict = None) -> dict:
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _process_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def run_webui(args) -> dict:
    """Train through a running Forge's REST API; Forge's own process is measured from outside."""
    settings = train_settings(args.workdir, "forge_webui", args.steps, args.resolution, args.rank)
    settings.pop("output_dir")  # the WebUI puts the job folder under its own outputs
    settings["output_name"] = "bench_forge_webui"
    prefix = args.webui.rstrip("/") + "/lora-trainer/v1"
    rss_before_mb = _process_mb(args.pid, "VmRSS")
    with open(f"/proc/{args.pid}/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS, so the high-water mark below is the run's
    pressed = time.time()
    _request(prefix + "/train", args.auth, {"config": settings, "overwrite": True})
    step_times, seen = [], 0
    while True:
        status = _request(prefix + "/status", args.auth)
        if status["step"] > seen:
            step_times += [time.time()] * (status["step"] - seen)
            seen = status["step"]
        if not status["running"]:
            break
        time.sleep(POLL_S)
    if status["state"] != "finished":
        raise SystemExit(f"the WebUI run did not finish: {status['state']} {status.get('message')}")
    return {
        "rss_before_train_mb": rss_before_mb,
        "peak_during_training_mb": _process_mb(args.pid, "VmHWM"),
        "peak_method": "the WebUI's VmHWM after clear_refs",
        "first_step_s": step_times[0] - pressed,
        "step_s": median_step_seconds(step_times, args.warmup),
        "step_times": step_times,
        "threads": "the WebUI's",
    }


# ---------------------------------------------------------------- driver


def print_report(args, label: str, forge: dict, cli: dict) -> None:
    extra = forge["peak_during_training_mb"] - forge["rss_before_train_mb"]
    print(
        f"\nSD1.5 architecture, random weights, fp32 on CPU, {args.resolution} px, batch 1, 8 images, rank "
        f"{args.rank}, {args.steps} steps, median s/step after {args.warmup} warm-up steps"
    )
    print(f"{'run':24s} {'to 1st step s':>14s} {'memory MB':>10s} {'s/step':>8s}   memory means")
    print(
        f"{label:24s} {forge['first_step_s']:14.1f} {extra:10.0f} {forge['step_s']:8.2f}   extra peak during "
        f"training (model held: {forge['rss_before_train_mb']:.0f} MB before Train; {forge['peak_method']})"
    )
    print(
        f"{'standalone CLI':24s} {cli['first_step_s']:14.1f} {cli['peak_rss_mb']:10.0f} {cli['step_s']:8.2f}   "
        "peak RSS of the whole process"
    )
    print(
        f"ratios {label} / CLI: Train->first step {forge['first_step_s'] / cli['first_step_s']:.3f}, "
        f"extra peak memory / CLI peak {extra / cli['peak_rss_mb']:.3f}, s/step {forge['step_s'] / cli['step_s']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lora_bench")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--standin", action="store_true", help="the Forge stand-in, in a worker process")
    where.add_argument("--webui", help="URL of a running Forge with this extension")
    where.add_argument("--standin-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pid", type=int, help="the running Forge's process id (with --webui)")
    parser.add_argument("--auth", default="", help="user:password for a WebUI started with --api-auth")
    args = parser.parse_args()
    if args.standin_worker:
        standin_worker(args)
        return
    if args.webui and not args.pid:
        parser.error("--webui needs --pid (the WebUI's process, measured through /proc)")
    ensure_inputs(args.workdir)
    os.makedirs(os.path.join(args.workdir, "host_bench"), exist_ok=True)
    print("Forge run ...", flush=True)
    forge = run_standin(args) if args.standin else run_webui(args)
    print("standalone CLI run ...", flush=True)
    cli = run_standalone(args)
    print_report(args, "Forge stand-in" if args.standin else "Forge (real, REST)", forge, cli)


if __name__ == "__main__":
    main()
