"""Paddle's launcher as a child process: its command, a watchdog, and one line on how the job ended.

:func:`run_job` starts ``python -m paddle.distributed.launch`` for this node
(``--max_restart 0``: a failed rank ends the job rather than restarting it
from scratch; ``--resume`` continues it from its checkpoint) with every rank
wrapped in :mod:`paddle_impl.launch.rank_exit`, then waits for it:

- several nodes: the rendezvous must complete (every rank of this node
  started) within ``connect_timeout`` seconds, or the launcher is stopped and
  the message names the nodes that did not join (read from the rendezvous
  store on node 0) or says that the master stopped answering;
- ``timeout``, when given, bounds the whole job (the benchmark uses it);
- when the launcher exits non-zero, :mod:`paddle_impl.launch.ending` names the
  rank that failed first from the rank records and worker logs;
- SIGTERM or SIGINT (Ctrl-C) to this process stops the launcher, which stops
  its ranks: the launcher runs in a session of its own, out of the terminal's
  reach, so nothing is left running.

Logs go to ``log_dir``: ``workerlog.<local rank>`` (Paddle's, appended to on
every run), ``rank.<global rank>.json`` (the records) and, unless another
file is given, ``launcher.log`` (the launcher's own output, with its
configuration and its copy of local rank 0's output). The console shows local
rank 0's output as it is written; from its ``error:`` line, first traceback or
Paddle error report on, the rest stays in the worker log only (all of it with
``verbose``), and the one line on the ending replaces it.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from paddle_impl.launch.ending import describe_ending, read_records
from paddle_impl.launch.nodes import Layout
from paddle_impl.launch.rank_exit import LAUNCH_ID_ENV

LAUNCHER_LOG = "launcher.log"
_JOB_ID = "default"  # Paddle's; the rendezvous keys are /<job id>/info/<pod>/<node rank>
_POLL_S = 0.5
# After SIGTERM the launcher gives its ranks up to 30 s to stop.
_STOP_GRACE_S = 40
# Variables through which Paddle's launcher would override the flags given here.
_OVERRIDING_ENV = ("POD_IP", "PADDLE_MASTER", "PADDLE_DEVICES", "PADDLE_NNODES", "PADDLE_RANK",
                   "PADDLE_TRAINER_ID", "PADDLE_NPROC_PER_NODE", "PADDLE_LOG_DIR", "PADDLE_MAX_RESTART",
                   "PADDLE_JOB_ID", "PADDLE_LOG_OVERWRITE", "PADDLE_LOG_LEVEL")


class LaunchFault(Exception):
    """The job failed, did not start or did not finish; the message is one line naming the rank,
    node or address. ``started``: whether every rank of this node had started."""

    def __init__(self, message: str, started: bool = False):
        super().__init__(message)
        self.started = started


@dataclass
class JobResult:
    command: list[str]
    wall_s: float


def training_program(train_args: Sequence[str]) -> list[str]:
    """``python -m paddle_impl.train`` with ``train_args``, as each rank runs it."""
    return [sys.executable, "-m", "paddle_impl.train", *train_args]


def launcher_command(layout: Layout, log_dir: Path, program: Sequence[str], host: str | None = None
                     ) -> list[str]:
    """The ``paddle.distributed.launch`` command of this node. ``host``: this node's address for the
    others (several nodes; see :func:`paddle_impl.launch.nodes.check_master`)."""
    command = [sys.executable, "-m", "paddle.distributed.launch", "--max_restart", "0",
               "--log_dir", str(log_dir)]
    command += ["--gpus", layout.gpus] if layout.gpus else ["--nproc_per_node", str(layout.nproc)]
    if layout.nnodes > 1:
        command += ["--nnodes", str(layout.nnodes), "--rank", str(layout.node_rank),
                    "--master", layout.master_endpoint]
        if host:
            command += ["--host", host]
    return command + [sys.executable, "-m", "paddle_impl.launch.rank_exit", *program]


class _ConsoleEcho:
    """Copies a worker log to the console as it grows, from ``offset`` on, up to the rank's own
    ``error:`` line, the first traceback or Paddle error report (everything with ``verbose``):
    the line on the job's ending says what they say."""

    _START = re.compile(r"^error: |Traceback \(most recent call last\)|C\+\+ Traceback|Error Message Summary|"
                        r"terminate called after throwing|^-{20,}\s*$")

    def __init__(self, path: Path, offset: int, stream: TextIO, verbose: bool):
        self.path, self.pos, self.stream, self.verbose = path, offset, stream, verbose
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.withheld = False

    def pump(self, final: bool = False) -> None:
        if self.withheld or not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        self.pending += self.decoder.decode(data, final=final)
        # Progress bars redraw with a carriage return: pass those through as they come.
        pieces = re.split(r"(?<=[\r\n])", self.pending)
        self.pending = "" if final else pieces.pop()
        for piece in pieces:
            if not self.verbose and self._START.search(piece):
                self.withheld = True
                break
            self.stream.write(piece)
        self.stream.flush()


def _joined_nodes(layout: Layout) -> list[int] | None:
    """Node ranks registered with the rendezvous store at the master, or None when it does not answer."""
    url = f"http://{layout.master_endpoint}/{_JOB_ID}/info"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the master is never behind a proxy
    try:
        with opener.open(url, timeout=2) as response:
            keys = json.loads(response.read())
    except urllib.error.HTTPError as err:
        return [] if err.code == 404 else None  # 404: no key under the prefix yet
    except (OSError, ValueError):
        return None
    return sorted(int(key.rsplit("/", 1)[1]) for key in keys)


def _rendezvous_fault(layout: Layout, joined: list[int] | None) -> LaunchFault:
    where = f"the rendezvous at {layout.master_text} (MASTER)"
    limit = f"within {layout.connect_timeout:g} s"
    if joined is None:
        return LaunchFault(f"{where} did not complete {limit}: the master stopped answering (node 0 ended?)")
    missing = [r for r in range(layout.nnodes) if r not in joined]
    return LaunchFault(f"{where} did not complete {limit}: node(s) {', '.join(map(str, missing))} of "
                       f"{layout.nnodes} did not join; start every node with NNODES={layout.nnodes}, its own "
                       "NODE_RANK and the same MASTER (CONNECT_TIMEOUT= waits longer)")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher; it stops its ranks (they run in sessions of their own) before it exits."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Stopped(Exception):
    """This process was asked to stop (SIGTERM, or SIGINT from the terminal)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


def _raise_stopped(signum, _frame) -> None:
    # Stopping the launcher is bounded (_stop); a second request must not interrupt it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise _Stopped(signum)


def run_job(layout: Layout, program: Sequence[str], log_dir: str | os.PathLike, *, host: str | None = None,
            out_file: str | os.PathLike | None = None, console: TextIO | None = None, verbose: bool = False,
            timeout: float | None = None, env: dict[str, str] | None = None) -> JobResult:
    """Run this node's share of the job to its end (see the module).

    ``out_file``: the launcher's output (default ``log_dir/launcher.log``);
    ``console``: where local rank 0's output is echoed (None: nowhere);
    ``env``: variables added to the ranks' environment. Returns the command and
    the wall time; raises :class:`LaunchFault` with one line otherwise.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = Path(out_file) if out_file else log_dir / LAUNCHER_LOG
    command = launcher_command(layout, log_dir, program, host)
    launch_id = uuid.uuid4().hex
    child_env = {k: v for k, v in os.environ.items() if k not in _OVERRIDING_ENV}
    child_env.update(env or {})
    child_env[LAUNCH_ID_ENV] = launch_id
    offsets = {p.name: p.stat().st_size for p in log_dir.glob("workerlog.*")}
    echo = _ConsoleEcho(log_dir / "workerlog.0", offsets.get("workerlog.0", 0), console, verbose) \
        if console is not None else None
    node = f" on node {layout.node_rank}" if layout.nnodes > 1 else ""

    started_at = time.monotonic()
    started = False
    handlers = {}
    with open(out_path, "a") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env, start_new_session=True)
        try:
            if threading.current_thread() is threading.main_thread():
                handlers = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
            while proc.poll() is None:
                time.sleep(_POLL_S)
                if echo is not None:
                    echo.pump()
                elapsed = time.monotonic() - started_at
                if not started:
                    started = len(read_records(log_dir, launch_id)) >= layout.nproc
                    if not started and layout.nnodes > 1 and elapsed > layout.connect_timeout:
                        fault = _rendezvous_fault(layout, _joined_nodes(layout))
                        _stop(proc)
                        raise fault
                if timeout is not None and elapsed > timeout:
                    _stop(proc)
                    raise LaunchFault(f"paddle.distributed.launch did not finish in {timeout:g} s{node}",
                                      started=started)
        except _Stopped as stop:
            _stop(proc)
            raise LaunchFault(f"stopped by {stop}{node}: the launcher stopped this node's ranks",
                              started=started) from None
        except BaseException:
            _stop(proc)
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if echo is not None:
                echo.pump(final=True)
    wall = time.monotonic() - started_at
    records = read_records(log_dir, launch_id)
    message = describe_ending(proc.returncode, records, log_dir, offsets, out_path, node)
    if message:
        raise LaunchFault(message, started=len(records) >= layout.nproc)
    return JobResult(command=command, wall_s=wall)
