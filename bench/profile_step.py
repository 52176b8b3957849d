"""Where our step time goes: the trainer's step split into the parts the floor also has (UNet forward with
the loss, backward, clip, optimizer) and the parts it has beyond the floor (batch assembly from the caches,
the scheduler, callbacks: TensorBoard, progress, the stop check), median milliseconds per step.

    .venv/bin/python bench/profile_step.py --workdir /tmp/lora_bench [--steps 8 --resolution 256 --rank 8]

Runs in-process on the random full-size SD1.5 checkpoint and the images bench_train.py builds under --workdir,
with the CLI's settings (accelerate runtime, thread count, caches in memory).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench"), os.path.join(REPO, "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lora_bench")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import torch

    from lora_trainer.config import config_from_dict
    from lora_trainer.train import image_trainer, runtime
    from lora_trainer.train.callbacks import CallbackList, TrainingCallback
    from lora_trainer.train.loop import TrainingLoop
    from lora_trainer.train.objectives import DdpmObjective

    checkpoint = os.path.join(args.workdir, "sd15_random.safetensors")
    data = os.path.join(args.workdir, "data")
    if not (os.path.exists(checkpoint) and os.path.isdir(data)):
        raise SystemExit(f"run bench/bench_train.py --workdir {args.workdir} first (it builds the model and data)")
    times = collections.defaultdict(list)
    step_marks = []

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name].append(time.perf_counter() - start)

        return wrapper

    # The parts of one step, wrapped where the trainer calls them.
    session = image_trainer.ImageTrainingSession
    session._batch_inputs = timed("batch from caches", session._batch_inputs)
    DdpmObjective.loss = timed("forward + loss", DdpmObjective.loss)
    rt = runtime.LocalRuntime
    rt.backward = timed("backward", rt.backward)
    rt.clip_grad_norm = timed("clip grad norm", rt.clip_grad_norm)
    rt.optimizer_step = timed("optimizer step", rt.optimizer_step)
    CallbackList.on_step_end = timed("callbacks (TensorBoard, ...)", CallbackList.on_step_end)
    CallbackList.should_stop = timed("stop check", CallbackList.should_stop)
    TrainingLoop._step = timed("whole optimizer step", TrainingLoop._step)

    class Marks(TrainingCallback):
        def on_step_end(self, info):
            step_marks.append(time.perf_counter())

    cfg = config_from_dict(
        {
            "train_data_dir": data,
            "base_model": checkpoint,
            "output_dir": os.path.join(args.workdir, "profile_out"),
            "resolution": args.resolution,
            "batch_size": 1,
            "lora_rank": args.rank,
            "max_train_steps": args.steps,
            "learning_rate": 1e-4,
            "cache_to_disk": False,
            "save_state": False,
        }
    )
    image_trainer.train_image(cfg, callbacks=[Marks()], log=lambda *a: None)
    gaps = [b - a for a, b in zip(step_marks, step_marks[1:])][args.warmup - 1 :]
    print(
        f"\nour step, SD1.5 random weights, {args.resolution} px, batch 1, rank {args.rank}, "
        f"{torch.get_num_threads()} threads; median ms per step after {args.warmup} warm-up steps"
    )
    print(f"  {'step to step (wall clock)':32s} {1000 * statistics.median(gaps):9.1f}")
    accounted = 0.0
    for name, values in times.items():
        value = statistics.median(values[args.warmup :] or values)
        if name not in ("whole optimizer step",):
            accounted += value
        print(f"  {name:32s} {1000 * value:9.1f}")
    print(f"  {'sum of the parts':32s} {1000 * accounted:9.1f}")


if __name__ == "__main__":
    main()
