"""Making ``accelerate launch --cpu --num_processes N train.py`` run N data-parallel processes.

accelerate's launcher starts a single process for ``--cpu`` and leaves the fan-out to ``mpirun``; without MPI
the other N-1 ranks never exist. When we detect that situation (CPU launch, a rendezvous address, no world
size from any launcher) we read N from the launcher's own command line and start the missing ranks ourselves
with the environment torch.distributed expects (gloo over 127.0.0.1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Optional

WORLD_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "LOCAL_RANK")


def _launcher_num_processes(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "launch" not in args:
        return None
    for i, arg in enumerate(args):
        if arg == "--num_processes" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--num_processes="):
            value = arg.split("=", 1)[1]
        else:
            continue
        return int(value) if value.isdigit() else None
    return None


def missing_cpu_ranks() -> int:
    """How many processes an accelerate CPU launch asked for but did not start (0 when nothing is missing)."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_ADDR" not in env:
        return 0
    if any(name in env for name in WORLD_VARIABLES):
        return 0
    wanted = _launcher_num_processes(os.getppid()) or 1
    return max(0, wanted - 1)


def start_missing_ranks(extra: int) -> List[subprocess.Popen]:
    """Start ranks 1..extra as copies of this command and make this process rank 0 (nothing when extra=0)."""
    if extra <= 0:
        return []
    world = extra + 1
    common = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    workers = []
    for rank in range(1, world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), **common)
        workers.append(subprocess.Popen([sys.executable, *sys.argv], env=env))
    os.environ.update(RANK="0", LOCAL_RANK="0", **common)
    return workers
