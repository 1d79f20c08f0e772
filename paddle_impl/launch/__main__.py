"""Train on several processes of this machine, or on several machines, through Paddle's launcher.

Usage (run on every node; ``make train-full`` builds it from its variables)::

    python -m paddle_impl.launch [--nproc N | --gpus 0,1,2,3]
        [--nnodes N --node-rank R --master HOST:PORT] [--connect-timeout 60]
        [--log-dir DIR] [-v] -- TRAINING OPTIONS

The training options are ``python -m paddle_impl.train``'s and are checked
here, once, before anything starts. Each node starts ``--nproc`` CPU processes
(gloo; default 1) or one process per GPU of ``--gpus``; ranks are global,
node by node (node 0 holds ranks 0 .. nproc-1). ``--master`` is node 0's
address and a free port, the same on every node. Before Paddle's launcher
starts, node 0 checks that the address is its own and the port free, and
every other node waits up to ``--connect-timeout`` seconds for the master to
answer; the rendezvous of all nodes must then complete within the same time.

Logs: ``--log-dir`` (default ``WORK_DIR/launch/node<R>``, distinct per node
in a shared work dir) holds ``workerlog.<local rank>``, ``launcher.log`` and
the rank records (:mod:`paddle_impl.launch.job`). The console shows local
rank 0's output.

Faults: a wrong option, an unusable master, a rendezvous that does not
complete, or a rank that fails end with one line naming the option, address
or rank and exit status 2 (``-v`` or ``GHM_TRACEBACK=1``: also tracebacks,
here and from the ranks). When a rank dies the others stop within seconds
(its node's launcher stops them; ranks on other nodes fail on the broken
connection); ``--resume`` then continues every rank from the last checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from common.atomic_write import check_writable_dir
from paddle_impl.errors import TRACEBACK_ENV, run_command, traceback_wanted
from paddle_impl.launch.job import LaunchFault, run_job, training_program
from paddle_impl.launch.nodes import DEFAULT_CONNECT_TIMEOUT, check_master, parse_layout


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launch options before ``--`` and the training options after it."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m paddle_impl.launch", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [launch options] -- TRAINING OPTIONS")
    # Strings: the values are checked together, each fault in one line (nodes.parse_layout).
    p.add_argument("--nproc", help="CPU processes on this node (default 1)")
    p.add_argument("--gpus", help="GPUs of this node, one process each, e.g. 0,1,2,3")
    p.add_argument("--nnodes", default="1", help="machines in the job (default 1)")
    p.add_argument("--node-rank", default="0", help="this machine's rank, 0 .. nnodes-1 (default 0)")
    p.add_argument("--master", help="HOST:PORT of node 0's rendezvous, the same on every node")
    p.add_argument("--connect-timeout", default=str(DEFAULT_CONNECT_TIMEOUT),
                   help="seconds to wait for the master, and for every node to join (default %(default)s)")
    p.add_argument("--log-dir", help="launcher and worker logs (default WORK_DIR/launch/node<R>)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with an error, also print tracebacks (or set GHM_TRACEBACK=1)")
    return p.parse_args(argv[:split]), argv[split + 1:]


def _run(args: argparse.Namespace, train_argv: list[str], verbose: bool) -> int:
    from paddle_impl.train import parse_args as parse_train_args

    layout = parse_layout(args.nnodes, args.node_rank, args.master, args.nproc, args.gpus,
                          args.connect_timeout)
    train = parse_train_args(train_argv)
    log_dir = Path(args.log_dir) if args.log_dir else Path(train.work_dir) / "launch" / f"node{layout.node_rank}"
    check_writable_dir(log_dir, "--log-dir")
    host = check_master(layout) if layout.nnodes > 1 else None
    devices = f"GPUs {layout.gpus}" if layout.gpus else f"{layout.nproc} CPU process(es)"
    nodes = f"node {layout.node_rank} of {layout.nnodes}, master {layout.master_text}, " \
        if layout.nnodes > 1 else ""
    print(f"[launch] {nodes}{devices}; logs in {log_dir}", file=sys.stderr)
    try:
        run_job(layout, training_program(train_argv), log_dir, host=host, console=sys.stderr, verbose=verbose,
                env={TRACEBACK_ENV: "1"} if verbose else None)
    except LaunchFault as err:
        if err.started:
            raise LaunchFault(f"{err}; --resume (RESUME=1) continues from the last checkpoint") from None
        raise
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, train_argv = parse_args(argv)
    verbose = args.verbose or traceback_wanted(train_argv)
    return run_command(lambda: _run(args, train_argv, verbose), argv, expected=(LaunchFault,))


if __name__ == "__main__":
    sys.exit(main())
