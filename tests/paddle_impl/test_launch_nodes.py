"""Launched jobs on CPU (gloo, 127.0.0.1): two nodes against one, a rank that dies, and resume.

Real ``python -m paddle_impl.launch`` processes, as ``make train-full`` runs
them, on a tiny synthetic COCO at 128x96 (12 training images: 3 iterations of
2 ranks x 2 images per epoch). Two "nodes" are two launches on this machine
with their own ``--node-rank`` and log folder and one shared ``--work-dir``, as
on machines sharing a file system. Faults are injected with
``GHM_INJECT_FAULT`` (:mod:`paddle_impl.engine.fault_injection`).

Weights are compared bit for bit: with two ranks the gradient all-reduce is
one float32 addition, which is commutative, so the ranks' order and the
transport (one node or two) cannot change a bit; and a resume restores every
rank's weights, optimizer, GHM and RNG state exactly.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paddle_impl.data.tiny_coco import generate
from paddle_impl.engine import checkpoint as ckpt

from tests.paths import ROOT
from tests.trees import assert_same_tree

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow
ITERS = 3
TRAIN = ["--scale", "128x96", "--num-workers", "0", "--no-progress", "--seed", "0", "--max-iters", str(ITERS),
         "--eval-interval", "0", "--warmup-iters", "2", "--ckpt-interval-iters", "1"]
# Compared bit for bit between runs that must end in the same state.
STATE_KEYS = ("iter", "world_size", "model", "ghm_per_rank", "optimizer", "lr_schedule", "sampler", "rng")
TIMEOUT = 900  # a guard against a hang, far above a run's duration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(out: Path, launch_args: list[str], train_args: list[str], fault: str | None = None) -> subprocess.Popen:
    """``python -m paddle_impl.launch LAUNCH_ARGS -- TRAIN_ARGS``, output to ``out``."""
    env = {k: v for k, v in os.environ.items() if k != "GHM_INJECT_FAULT"}
    if fault:
        env["GHM_INJECT_FAULT"] = fault
    with open(out, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "paddle_impl.launch", *launch_args, "--", *train_args],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen, out: Path) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launch stops Paddle's launcher and its ranks
        proc.wait(timeout=120)
        pytest.fail(f"the launch did not end in {TIMEOUT} s; output {out}")
    return code, out.read_text()


def error_line(code: int, output: str) -> str:
    """The launch's last line, which must be its one error line (exit status 2, no traceback)."""
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), output[-3000:]
    return lines[-1]


def run(tmp: Path, name: str, launch_args: list[str], train_args: list[str], fault: str | None = None
        ) -> tuple[int, str]:
    out = tmp / f"{name}.out"
    return finish(start(out, launch_args, train_args, fault), out)


def two_nodes(tmp: Path, name: str, train_args: list[list[str]]) -> list[tuple[int, str]]:
    """Node 0 and node 1 (one process each) with the same master; ``train_args`` per node."""
    master = f"127.0.0.1:{free_port()}"
    procs = []
    for rank in (0, 1):
        out = tmp / f"{name}.node{rank}.out"
        launch = ["--nnodes", "2", "--node-rank", str(rank), "--master", master, "--nproc", "1"]
        procs.append((start(out, launch, train_args[rank]), out))
    return [finish(proc, out) for proc, out in procs]


def logged(work: Path) -> list[dict]:
    return [json.loads(line) for line in open(work / "log.jsonl")]


def assert_same_state(a: dict, b: dict) -> None:
    for key in STATE_KEYS:
        assert_same_tree(a[key], b[key], key)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "coco", train=12, val=2, seed=0, size=(128, 192))


@pytest.fixture(scope="module")
def one_node(coco, tmp_path_factory) -> Path:
    """The reference: 2 processes on one node, uninterrupted."""
    tmp = tmp_path_factory.mktemp("one_node")
    work = tmp / "work"
    code, output = run(tmp, "one_node", ["--nproc", "2"], ["--coco", str(coco), "--work-dir", str(work), *TRAIN])
    assert code == 0, output[-3000:]
    return work


def test_two_nodes_train_as_one_node_with_two_processes(coco, one_node, tmp_path):
    work = tmp_path / "work"
    args = ["--coco", str(coco), "--work-dir", str(work), *TRAIN]
    for code, output in two_nodes(tmp_path, "nodes", [args, args]):
        assert code == 0, output[-3000:]
    records = {rank: json.loads((work / "launch" / f"node{rank}" / f"rank.{rank}.json").read_text())
               for rank in (0, 1)}
    assert [r["exit_code"] for r in records.values()] == [0, 0], "global rank r ran on node r"
    log = logged(work)
    assert [r["iter"] for r in log] == list(range(1, ITERS + 1))
    assert all(r["param_rank_spread"] == 0.0 for r in log), "the ranks hold different weights"
    assert json.loads((work / "run.json").read_text())["world_size"] == 2
    two, one = ckpt.load_checkpoint(work / "latest.ckpt"), ckpt.load_checkpoint(one_node / "latest.ckpt")
    assert_same_state(two, one)
    assert [r["loss"] for r in log] == [r["loss"] for r in logged(one_node)]


def test_a_killed_rank_stops_the_job_and_resume_ends_as_the_uninterrupted_run(coco, one_node, tmp_path):
    """Rank 1 is killed (SIGKILL) as iteration 3 begins: the job ends naming it, and --resume from
    the last complete checkpoint finishes with the uninterrupted run's state.

    That checkpoint is iteration 2's, or iteration 1's when the launcher stops rank 0 while it is
    still writing iteration 2's (the write is atomic, so the previous file stays whole)."""
    work = tmp_path / "work"
    args = ["--coco", str(coco), "--work-dir", str(work), *TRAIN]
    line = error_line(*run(tmp_path, "killed", ["--nproc", "2"], args, fault="1:3:kill"))
    assert line.startswith("error: rank 1 was killed by SIGKILL"), line
    assert "workerlog.1" in line and "--resume" in line, line
    assert ckpt.load_checkpoint(work / "latest.ckpt")["iter"] in (1, 2)
    assert [r["iter"] for r in logged(work)] == [1, 2]

    code, output = run(tmp_path, "resumed", ["--nproc", "2"], [*args, "--resume"])
    assert code == 0, output[-3000:]
    assert [r["iter"] for r in logged(work)] == list(range(1, ITERS + 1))
    assert_same_state(ckpt.load_checkpoint(work / "latest.ckpt"), ckpt.load_checkpoint(one_node / "latest.ckpt"))


def test_a_raising_rank_is_named_with_its_error(coco, tmp_path):
    args = ["--coco", str(coco), "--work-dir", str(tmp_path / "work"), *TRAIN]
    line = error_line(*run(tmp_path, "raised", ["--nproc", "2"], args, fault="1:1:raise"))
    assert line.startswith("error: rank 1 exited with status 1: RuntimeError: GHM_INJECT_FAULT: rank 1 fails "
                           "at iteration 1 on purpose"), line


def test_a_node_without_the_checkpoint_stops_the_resume(coco, one_node, tmp_path):
    """Node 1 does not see node 0's --work-dir (no shared file system): every rank refuses to resume
    rather than node 1 training from scratch."""
    shared = tmp_path / "node0_work"
    shared.mkdir()
    (shared / "latest.ckpt").write_bytes((one_node / "latest.ckpt").read_bytes())
    # One iteration beyond the checkpoint: without the check both nodes would train on, out of step.
    base = ["--coco", str(coco), *TRAIN, "--max-iters", str(ITERS + 1), "--resume"]
    results = two_nodes(tmp_path, "resume", [["--work-dir", str(shared), *base],
                                             ["--work-dir", str(tmp_path / "node1_work"), *base]])
    for code, output in results:
        line = error_line(code, output)
        assert "--resume: the ranks would start at different iterations" in line, line
        assert f"rank 0: iteration {ITERS} from {shared / 'latest.ckpt'}, rank 1: no checkpoint" in line, line


def test_a_node_alone_stops_at_the_rendezvous(tmp_path):
    """Node 0 of 2 waits for node 1 no longer than --connect-timeout, then names it."""
    master = f"127.0.0.1:{free_port()}"
    launch = ["--nnodes", "2", "--node-rank", "0", "--master", master, "--connect-timeout", "5"]
    line = error_line(*run(tmp_path, "alone", launch, ["--work-dir", str(tmp_path / "work")]))
    assert line == (f"error: the rendezvous at {master} (MASTER) did not complete within 5 s: node(s) 1 of 2 "
                    "did not join; start every node with NNODES=2, its own NODE_RANK and the same MASTER "
                    "(CONNECT_TIMEOUT= waits longer)"), line


def test_a_stopped_launch_stops_paddles_launcher(tmp_path):
    """SIGTERM to the launch (as a scheduler or Ctrl-C sends) stops Paddle's launcher too, which runs
    in a session of its own: afterwards nothing serves the master port any more."""
    host, port = "127.0.0.1", free_port()
    launch = ["--nnodes", "2", "--node-rank", "0", "--master", f"{host}:{port}", "--connect-timeout", "600"]
    out = tmp_path / "stopped.out"
    proc = start(out, launch, ["--work-dir", str(tmp_path / "work")])
    for _ in range(600):  # until Paddle's launcher serves the rendezvous
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                break
        assert proc.poll() is None, out.read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    line = error_line(*finish(proc, out))
    assert line == "error: stopped by SIGTERM on node 0: the launcher stopped this node's ranks", line
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
