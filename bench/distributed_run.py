"""Run (a) of the data-parallel benchmark: the training program on 2 CPU processes (gloo) through
`paddle_impl.launch.job` (``paddle.distributed.launch``), and its log and final checkpoint read back.
See `bench.data_parallel`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from paddle_impl.engine import checkpoint as ckpt
from paddle_impl.engine.report import read_jsonl
from paddle_impl.launch.job import LaunchFault, run_job, training_program
from paddle_impl.launch.nodes import parse_layout

WORLD_SIZE = 2
BATCH_PER_PROCESS = 2
WARMUP_ITERS = 2


class LaunchError(RuntimeError):
    """``paddle.distributed.launch`` failed or timed out; the message names its logs."""


def _last_lines(path: Path, count: int = 3) -> str:
    """The last non-empty lines of a worker log, indented, for an error message ('' without the file)."""
    if not path.is_file():
        return ""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-count:]
    return f"\n  {path.name}:\n" + "\n".join(f"    {line}" for line in lines)


def train_args(coco: Path, run_dir: Path, iters: int, lr: float, seed: int, scale: tuple[int, int],
               epochs: int) -> list[str]:
    """``paddle_impl.train`` arguments of the distributed run."""
    return ["--coco", str(coco), "--work-dir", str(run_dir), "--batch-size", str(BATCH_PER_PROCESS),
            "--lr", repr(lr), "--warmup-iters", str(WARMUP_ITERS), "--epochs", str(epochs),
            "--milestones", str(epochs + 1), "--max-iters", str(iters), "--scale", f"{scale[0]}x{scale[1]}",
            "--num-workers", "0", "--seed", str(seed), "--eval-interval", "0", "--no-progress"]


def _where(log_dir: Path, out_file: Path) -> str:
    return f"launcher output {out_file}, worker logs {log_dir}/workerlog.0 and workerlog.1"


def launch(program_args: list[str], log_dir: Path, out_file: Path, timeout: float = 1200
           ) -> tuple[list[str], float]:
    """The training program with ``program_args`` on ``WORLD_SIZE`` CPU processes, through
    `paddle_impl.launch.job`, waited for; returns the launcher command and the wall time.
    Raises :class:`LaunchError` naming the logs when the job fails or times out."""
    shutil.rmtree(log_dir, ignore_errors=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        job = run_job(parse_layout(nproc=str(WORLD_SIZE)), training_program(program_args),
                      log_dir, out_file=out_file, timeout=timeout)
    except LaunchFault as err:
        raise LaunchError(f"{err}; {_where(log_dir, out_file)}{_last_lines(log_dir / 'workerlog.0')}"
                          f"{_last_lines(log_dir / 'workerlog.1')}") from None
    return job.command, job.wall_s


def run_distributed(coco: Path, work_dir: Path, iters: int, lr: float, seed: int,
                    scale: tuple[int, int], epochs: int, timeout: float = 1200) -> dict[str, Any]:
    """Run (a) and read back its log and final checkpoint.

    Returns ``{'command', 'wall_s', 'log': [per-iteration records], 'model_state': {name: array}
    (rank 0's), 'ghm': [per-rank {key: array}], 'momentum': {name: array}}``. Raises
    :class:`LaunchError` naming the logs when the launcher fails or times out.
    """
    run_dir, log_dir, out_file = work_dir / "dp2", work_dir / "launch_log", work_dir / "launch.out"
    shutil.rmtree(run_dir, ignore_errors=True)
    command, wall = launch(train_args(coco, run_dir, iters, lr, seed, scale, epochs), log_dir, out_file, timeout)
    where = _where(log_dir, out_file)
    log = read_jsonl(run_dir / "log.jsonl")
    if [r["iter"] for r in log] != list(range(1, iters + 1)):
        raise LaunchError(f"{run_dir / 'log.jsonl'} has iterations {[r['iter'] for r in log]}, "
                          f"expected 1..{iters}; {where}")
    state = ckpt.load_checkpoint(run_dir / "latest.ckpt")
    if state["world_size"] != WORLD_SIZE or state["iter"] != iters:
        raise LaunchError(f"{run_dir / 'latest.ckpt'}: world_size {state['world_size']}, iter {state['iter']}; "
                          f"expected {WORLD_SIZE} and {iters}; {where}")
    return {"command": command, "wall_s": wall, "log": log, "model_state": state["model"],
            "ghm": state["ghm_per_rank"], "momentum": state["optimizer"]["momentum_buffers"]}
