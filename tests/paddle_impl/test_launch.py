"""The launcher's checks and its account of a job's end, without starting Paddle.

The launched jobs themselves (two nodes, a dying rank, resume, a missing node)
are in ``test_launch_nodes.py``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest

from paddle_impl.engine.fault_injection import FAULT_ENV, maybe_fail
from paddle_impl.launch.__main__ import main
from paddle_impl.launch.ending import describe_ending, read_records
from paddle_impl.launch.job import _ConsoleEcho

from tests.paths import ROOT

GLOO_ABORT = ("terminate called after throwing an instance of 'gloo::TimeoutException'\n"
              "  what():  [/paddle/third_party/gloo/gloo/transport/tcp/pair.cc:584] TIMEOUT self_rank = 0 "
              "pair_rank = 1 peer_str = [127.0.0.1]:16807\n")


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("launch, expected", [
    (["--nnodes", "2"], "error: --nnodes 2 (NNODES) needs --master HOST:PORT (MASTER): node 0's address and a "
                        "free port, the same on every node"),
    (["--nnodes", "2", "--node-rank", "2", "--master", "127.0.0.1:29500"],
     "error: --node-rank 2 (NODE_RANK): out of range for --nnodes 2 (NNODES); node ranks are 0..1"),
    (["--node-rank", "1"], "error: --node-rank 1 (NODE_RANK): out of range for --nnodes 1 (NNODES); "
                           "node ranks are 0..0"),
    (["--node-rank", "-1"], "error: --node-rank (NODE_RANK) -1: must be >= 0"),
    (["--nnodes", "two"], "error: --nnodes (NNODES) 'two': not an integer"),
    (["--master", "127.0.0.1:29500"], "error: --master 127.0.0.1:29500 (MASTER) is for several nodes: give "
                                      "--nnodes (NNODES) too"),
    (["--nnodes", "2", "--master", "10.0.0.1"], "error: --master '10.0.0.1' (MASTER): expected HOST:PORT, "
                                                "e.g. 10.0.0.1:29500"),
    (["--nnodes", "2", "--master", "10.0.0.1:70000"], "error: --master 10.0.0.1:70000 (MASTER): port 70000 is "
                                                      "above 65535"),
    (["--nnodes", "2", "--master", "no-such-host.invalid:29500"],
     "error: --master no-such-host.invalid:29500 (MASTER): cannot resolve no-such-host.invalid"),
    (["--nproc", "2", "--gpus", "0,1"], "error: --nproc (NPROC) and --gpus (GPUS) both given: GPUS starts one "
                                        "process per GPU"),
    (["--gpus", "0,0"], "error: --gpus '0,0' (GPUS): expected distinct GPU numbers such as 0,1,2,3"),
    (["--nproc", "0"], "error: --nproc (NPROC) 0: must be >= 1"),
    (["--connect-timeout", "0"], "error: --connect-timeout 0 (CONNECT_TIMEOUT): must be > 0 seconds"),
])
def test_bad_layouts_are_named_in_one_line(launch, expected, tmp_path, capsys):
    assert main([*launch, "--", "--work-dir", str(tmp_path / "work")]) == 2
    assert one_error_line(capsys).startswith(expected)
    assert not (tmp_path / "work").exists(), "nothing is written for bad input"


def test_an_unreachable_master_is_named_after_the_connect_timeout(tmp_path, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = ["--nnodes", "2", "--node-rank", "1", "--master", f"127.0.0.1:{port}", "--connect-timeout", "1.5"]
    assert main([*launch, "--", "--work-dir", str(tmp_path / "work")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --master 127.0.0.1:{port} (MASTER): no answer from 127.0.0.1:{port} within "
                           "1.5 s (Connection refused); start node 0 with the same MASTER"), line


def test_node_0_must_own_the_master_address_and_find_its_port_free(tmp_path, capsys):
    args = ["--", "--work-dir", str(tmp_path / "work")]
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    assert main(["--nnodes", "2", "--master", "192.0.2.1:29500", *args]) == 2
    assert one_error_line(capsys).startswith("error: --master 192.0.2.1:29500 (MASTER): 192.0.2.1 is not an "
                                             "address of this machine; node 0 serves the rendezvous")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--nnodes", "2", "--master", f"127.0.0.1:{port}", *args]) == 2
    assert one_error_line(capsys).startswith(f"error: --master 127.0.0.1:{port} (MASTER): port {port} is not "
                                             "free on this machine")


def test_training_options_are_checked_before_launching(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--nproc", "2", "--", "--work-dir", str(tmp_path), "--max-iters", "0"])
    assert exit_info.value.code == 2
    assert "--max-iters" in capsys.readouterr().err
    assert not (tmp_path / "launch").exists()


# How a job ended -----------------------------------------------------------------------------------

def write_rank(log_dir: Path, rank: int, log: str, launch_id: str = "L", **end) -> None:
    record = {"launch_id": launch_id, "rank": rank, "local_rank": rank, "log": f"workerlog.{rank}",
              "pid": 1, "started": 0.0}
    if end:
        record.update({"ended": 1.0, "signal": None, "stopped_by_launcher": None, **end})
    (log_dir / f"rank.{rank}.json").write_text(json.dumps(record))
    with open(log_dir / f"workerlog.{rank}", "a") as f:
        f.write(log)


def ending(log_dir: Path, code: int, offsets: dict | None = None, node: str = "") -> str | None:
    return describe_ending(code, read_records(log_dir, "L"), log_dir, offsets or {}, log_dir / "launcher.log", node)


def test_the_killed_rank_is_named_not_the_one_the_launcher_stopped(tmp_path):
    write_rank(tmp_path, 0, "[train] ...\n", exit_code=-15, signal="SIGTERM", stopped_by_launcher="SIGTERM")
    write_rank(tmp_path, 1, "", exit_code=-9, signal="SIGKILL")
    assert ending(tmp_path, 241) == (f"rank 1 was killed by SIGKILL (log {tmp_path / 'workerlog.1'}); "
                                     "1 other rank(s) stopped after it")


def test_a_rank_that_lost_its_peer_on_another_node_says_so(tmp_path):
    write_rank(tmp_path, 0, "[train] ...\n" + GLOO_ABORT, exit_code=-6, signal="SIGABRT")
    line = ending(tmp_path, 250, node=" on node 0")
    assert line.startswith("rank 0 on node 0 lost the connection to rank 1 (gloo: what(): "), line
    assert line.endswith(f"a rank on another node failed first, and that node's launcher names it "
                         f"(log {tmp_path / 'workerlog.0'})"), line


def test_the_same_error_on_every_rank_is_said_once(tmp_path):
    for rank in (0, 1):
        write_rank(tmp_path, rank, "error: --coco /x: folder not found\n", exit_code=2)
    assert ending(tmp_path, 2) == ("ranks 0, 1 exited with status 2: --coco /x: folder not found "
                                   f"(log {tmp_path / 'workerlog.0'})")


def test_only_this_runs_log_and_records_count(tmp_path):
    write_rank(tmp_path, 0, "error: an old run's fault\n", launch_id="old", exit_code=2)
    offset = (tmp_path / "workerlog.0").stat().st_size
    assert ending(tmp_path, 1) == ("paddle.distributed.launch exited with status 1 before any training process "
                                   f"started; see {tmp_path / 'launcher.log'}")
    write_rank(tmp_path, 0, "Traceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: boom\n",
               exit_code=1)
    assert ending(tmp_path, 1, {"workerlog.0": offset}).startswith("rank 0 exited with status 1: RuntimeError: boom")
    assert ending(tmp_path, 1).startswith("rank 0 exited with status 1: an old run's fault"), \
        "without the offset the earlier run's line is read: the offset is what keeps it out"


def test_a_job_whose_ranks_all_finished_has_no_fault(tmp_path):
    for rank in (0, 1):
        write_rank(tmp_path, rank, "done\n", exit_code=0)
    assert ending(tmp_path, 0) is None


@pytest.mark.parametrize("ending", ["Traceback (most recent call last):\n  File \"x\"\nRuntimeError: boom\n",
                                    "error: --resume: boom\n", GLOO_ABORT])
def test_the_console_shows_rank_0_up_to_its_error(ending, tmp_path):
    log = tmp_path / "workerlog.0"
    log.write_text("an earlier run\n")
    offset = log.stat().st_size
    shown, everything = StringIO(), StringIO()
    echoes = [_ConsoleEcho(log, offset, shown, verbose=False), _ConsoleEcho(log, offset, everything, verbose=True)]
    with open(log, "a") as f:
        f.write("[train] start\ntrain:  50%\r")
        f.flush()
        for echo in echoes:
            echo.pump()
        f.write("train: 100%\r\n" + ending)
    for echo in echoes:
        echo.pump(final=True)
    assert shown.getvalue() == "[train] start\ntrain:  50%\rtrain: 100%\r\n"
    assert everything.getvalue().endswith(ending)
    assert "an earlier run" not in everything.getvalue()


# One rank's record -----------------------------------------------------------------------------------

def rank_exit(tmp_path: Path, code: str) -> subprocess.Popen:
    env = {**os.environ, "PADDLE_TRAINER_ID": "3", "PADDLE_LOCAL_RANK": "1", "PADDLE_LOG_DIR": str(tmp_path),
           "GHM_LAUNCH_ID": "L"}
    return subprocess.Popen([sys.executable, "-m", "paddle_impl.launch.rank_exit", sys.executable, "-c", code],
                            cwd=ROOT, env=env, start_new_session=True)


def test_a_rank_killed_by_sigkill_is_recorded(tmp_path):
    proc = rank_exit(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    record = json.loads((tmp_path / "rank.3.json").read_text())
    assert (record["rank"], record["log"], record["launch_id"]) == (3, "workerlog.1", "L")
    assert (record["exit_code"], record["signal"], record["stopped_by_launcher"]) == (-9, "SIGKILL", None)


def test_a_rank_the_launcher_stops_is_recorded_as_stopped(tmp_path):
    proc = rank_exit(tmp_path, "import time; time.sleep(60)")
    record_file = tmp_path / "rank.3.json"
    deadline = time.monotonic() + 60
    while not record_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the child is started right after the first record
    os.killpg(proc.pid, signal.SIGTERM)  # what Paddle's launcher does to stop a rank
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    record = json.loads(record_file.read_text())
    assert (record["exit_code"], record["stopped_by_launcher"]) == (-15, "SIGTERM")


def test_the_fault_switch_fails_only_the_named_rank_and_iteration(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1:3:raise")
    maybe_fail(0, 3)
    maybe_fail(1, 2)
    with pytest.raises(RuntimeError, match="rank 1 fails at iteration 3 on purpose"):
        maybe_fail(1, 3)
    monkeypatch.setenv(FAULT_ENV, "1:3:explode")
    with pytest.raises(ValueError, match="GHM_INJECT_FAULT='1:3:explode'"):
        maybe_fail(0, 1)
