"""Input pipeline: the share of a training iteration spent waiting for data, per DataLoader worker count.

    python -m bench.data_wait [--size 1333x800] [--iters 24] [--skip 2] [--workers 0,2] [--batch 2]
                              [--seed 0] [--timeout 7200] [--work-dir build/bench_data]
                              [--out reports/bench_data.json]

The training program itself (``python -m paddle_impl.train``, one process, as
``make train-full`` runs it) trains ``--iters`` iterations on a tiny COCO
resized to fit ``--size`` (its ``--scale``; 1333x800 is the COCO setting),
once for each worker count of ``--workers``. Its loop records, per iteration
in ``log.jsonl``, ``data_time`` (from asking the DataLoader for the batch to
having it) and ``time`` (the whole iteration, the wait included). Reported
per worker count: ``data_wait_share = sum(data_time) / sum(time)`` over the
iterations after the first ``--skip``, with medians and the largest wait.

The skipped iterations are reported apart: the first one of an epoch starts
the DataLoader (its workers, or its reading thread) and waits for its first
batch, once per epoch, that is once in 7330 iterations on COCO. So that the
measured iterations are the inside of an epoch, as nearly all of COCO
training is, the tiny COCO (the project's generator, images drawn at 480x320)
gets enough training images for all of them to lie in the first epoch, and
the benchmark checks that they do.

Threads and CPU settings are the training program's own. The run folders
(``WORK_DIR/workers<N>``) keep the logs and the program's output
(``WORK_DIR/workers<N>.out``); the checkpoint and weights the program writes
at its end are removed once read, as nothing here needs them.
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from common.arguments import format_size, non_negative, parse_size, positive, positive_float
from paddle_impl.config import get_config
from paddle_impl.errors import run_command

DEFAULT_SIZE = format_size(get_config()["data"]["scale"])
DEFAULT_WORKERS = "0,2"
# Training images the tiny COCO drops (its no-annotation and 24-pixel-strip roles), plus spare ones.
EXTRA_IMAGES = 8


class TrainingRunError(RuntimeError):
    """The training program failed, timed out or logged other iterations than asked; the message names its output."""


# Arguments and arithmetic: no Paddle here --------------------------------------------------------

def parse_workers(text: str) -> list[int]:
    """``"0,2"`` -> ``[0, 2]``: distinct worker counts, each 0 or more."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker counts such as 0,2, got {text!r}") from None
    if any(c < 0 for c in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"worker counts must be distinct and 0 or more, got {text!r}")
    return counts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.data_wait", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=DEFAULT_SIZE,
                   help="resize scale WxH of the training pipeline (default %(default)s, the COCO setting)")
    p.add_argument("--iters", type=positive, default=24, help="training iterations per run (default %(default)s)")
    p.add_argument("--skip", type=non_negative, default=2,
                   help="first iterations left out of the share, reported apart (default %(default)s)")
    p.add_argument("--workers", type=parse_workers, default=parse_workers(DEFAULT_WORKERS),
                   help="DataLoader worker counts, one run each (default %s)" % DEFAULT_WORKERS)
    p.add_argument("--batch", type=positive, default=2, help="images per batch (default %(default)s)")
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--timeout", type=positive_float, default=7200, help="seconds allowed per run (default %(default)s)")
    p.add_argument("--work-dir", type=Path, default=Path("build/bench_data"))
    p.add_argument("--out", type=Path, default=Path("reports/bench_data.json"), help="JSON report")
    args = p.parse_args(argv)
    if args.skip >= args.iters:
        p.error(f"--skip {args.skip} leaves none of --iters {args.iters} to measure")
    if not args.timeout > 0:
        p.error(f"--timeout must be positive, got {args.timeout}")
    return args


def training_images(batch: int, iters: int) -> int:
    """Training images to generate so that ``iters`` batches of ``batch`` fit in one epoch."""
    return batch * iters + EXTRA_IMAGES


def training_command(coco: Path, run_dir: Path, size: tuple[int, int], batch: int, iters: int,
                     workers: int, seed: int) -> list[str]:
    """The training program's command line for one run (evaluation only at its end, as it must)."""
    w, h = size
    return [sys.executable, "-m", "paddle_impl.train", "--coco", str(coco), "--work-dir", str(run_dir),
            "--scale", f"{w}x{h}", "--batch-size", str(batch), "--max-iters", str(iters),
            "--num-workers", str(workers), "--seed", str(seed), "--eval-interval", "0", "--no-progress"]


def wait_share(records: Sequence[dict[str, Any]], skip: int) -> dict[str, Any]:
    """The data-wait figures of one run from its ``log.jsonl`` records (in iteration order).

    Returns ``data_wait_share`` (``sum(data_time) / sum(time)`` over the
    records after the first ``skip``), the medians of both times and the
    largest wait over the same records, and the skipped records' times.
    """
    if skip < 0 or skip >= len(records):
        raise ValueError(f"skipping {skip} of {len(records)} iterations leaves none to measure")
    for r in records:
        data_time, total = r["data_time"], r["time"]
        if not (math.isfinite(data_time) and math.isfinite(total) and 0 <= data_time <= total and total > 0):
            raise ValueError(f"iteration {r.get('iter')}: data_time {data_time} and time {total} are not "
                             "0 <= data_time <= time with time > 0")
    measured = records[skip:]
    waits, totals = [r["data_time"] for r in measured], [r["time"] for r in measured]
    return {
        "measured_iterations": [r["iter"] for r in measured],
        "data_wait_share": sum(waits) / sum(totals),
        "data_time_sum_s": sum(waits), "time_sum_s": sum(totals),
        "data_time_median_s": statistics.median(waits), "time_median_s": statistics.median(totals),
        "data_time_max_s": max(waits),
        "skipped": [{"iter": r["iter"], "data_time": r["data_time"], "time": r["time"]} for r in records[:skip]],
        "per_iteration": [{"iter": r["iter"], "data_time": r["data_time"], "time": r["time"]} for r in measured],
    }


def summary_line(report: dict[str, Any], out: Path | str) -> str:
    """The one line printed at the end (the JSON has the rest)."""
    s = report["settings"]
    runs = ", ".join(
        f"{r['num_workers']} workers {100 * r['data_wait_share']:.2f}% "
        f"(median wait {r['data_time_median_s']:.3f} s of {r['time_median_s']:.2f} s)"
        for r in report["runs"])
    return (f"data wait at {s['size']} (batch {s['batch']}), iterations {s['skip'] + 1}-{s['iters']}: "
            f"{runs} | {out}")


# The runs ----------------------------------------------------------------------------------------

def prepare_data(work_dir: Path, batch: int, iters: int, seed: int) -> Path:
    """The tiny COCO with enough training images for one epoch of ``iters`` batches (generated once)."""
    from paddle_impl.data.tiny_coco import generate

    images = training_images(batch, iters)
    root = work_dir / f"tiny_coco_train{images}_seed{seed}"
    if not (root / "annotations" / "instances_val2017.json").is_file():
        generate(root, train=images, val=1, seed=seed, overwrite=True)
    return root


def run_training(command: list[str], run_dir: Path, timeout: float) -> tuple[list[dict], float]:
    """Run the training program once; returns its ``log.jsonl`` records and the wall time."""
    from paddle_impl.engine.report import read_jsonl

    shutil.rmtree(run_dir, ignore_errors=True)
    output = run_dir.with_suffix(".out")
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(output, "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise TrainingRunError(f"{output}: the training run did not finish in {timeout:g} s") from None
    wall = time.perf_counter() - started
    if code != 0:
        raise TrainingRunError(f"{output}: the training run exited with status {code}")
    records = read_jsonl(run_dir / "log.jsonl")
    for leftover in [*run_dir.glob("*.ckpt"), *run_dir.glob("*.pdparams")]:
        leftover.unlink()
    return records, wall


def measure_run(args: argparse.Namespace, coco: Path, workers: int) -> dict[str, Any]:
    from bench.machine import load_average

    run_dir = args.work_dir / f"workers{workers}"
    command = training_command(coco, run_dir, args.size, args.batch, args.iters, workers, args.seed)
    print(f"[data_wait] {workers} workers: {' '.join(command)}", file=sys.stderr)
    load_before = load_average()
    records, wall = run_training(command, run_dir, args.timeout)
    iterations = [r["iter"] for r in records]
    if iterations != list(range(1, args.iters + 1)):
        raise TrainingRunError(f"{run_dir / 'log.jsonl'}: iterations {iterations}, expected 1..{args.iters}")
    epochs = sorted({r["epoch"] for r in records})
    if epochs != [1]:
        raise TrainingRunError(f"{run_dir / 'log.jsonl'}: the iterations span epochs {epochs}, "
                               "so epoch starts would be measured; generate more images")
    return {"num_workers": workers, **wait_share(records, args.skip), "wall_s": wall,
            "command": command, "run_dir": str(run_dir),
            "load_average_before": load_before, "load_average_after": load_average()}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, write; exit status 0, or 2 with one line for bad input or a fault."""
    args = parse_args(argv)
    return run_command(lambda: _run(args), argv, expected=(TrainingRunError,))


def _run(args: argparse.Namespace) -> int:
    from common.atomic_write import write_json
    from bench.machine import machine_info
    from paddle_impl.data.dataset import PREFETCH_FACTOR

    coco = prepare_data(args.work_dir, args.batch, args.iters, args.seed)
    runs = [measure_run(args, coco, workers) for workers in args.workers]
    w, h = args.size
    report = {
        "what": "share of each training iteration spent waiting for the DataLoader, python -m "
                "paddle_impl.train on a tiny COCO, per worker count",
        "settings": {"size": f"{w}x{h}", "iters": args.iters, "skip": args.skip, "batch": args.batch,
                     "seed": args.seed, "workers": args.workers, "prefetch_factor": PREFETCH_FACTOR,
                     "coco": str(coco), "train_images_generated": training_images(args.batch, args.iters)},
        "environment": machine_info(),
        "runs": runs,
    }
    write_json(args.out, report, indent=2)
    print(summary_line(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
