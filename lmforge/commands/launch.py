"""``--nproc N``: run this same command as a torchrun job of N processes on this machine.

``lmforge pretrain --nproc 2 ...`` is ``torchrun --standalone --nproc_per_node 2 -m lmforge
pretrain ...``: one process per GPU (or, on a CPU, per share of its cores), each one rank of a
DDP or FSDP job (``--train.strategy``). Several machines are launched with torchrun itself
(README: "Train on several GPUs or machines").
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


def without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line minus ``--nproc N`` / ``--nproc=N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``lmforge ARGV`` (without --nproc) under torchrun with ``nproc`` processes on this
    machine; returns torchrun's exit status. Each process gets an equal share of the CPU
    threads unless OMP_NUM_THREADS is set."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "lmforge", *without_nproc(argv),
    ]  # fmt: skip
    print(f"lmforge: {nproc} processes: {' '.join(command[1:6])} -m lmforge ...", file=sys.stderr)
    return subprocess.run(command, env=env, check=False).returncode
