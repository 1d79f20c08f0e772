"""Where the processes of a job run: the node layout, validated, and the master checked.

A job is ``nnodes`` machines (nodes), each starting ``python -m paddle_impl.launch``
with its own ``node_rank`` (0 .. nnodes-1) and the same ``master``: node 0's
address and a free TCP port. Paddle's launcher runs a small HTTP key-value
store there (the rendezvous, on node 0) through which the nodes exchange their
addresses; the training processes then connect to each other directly.

Paddle's launcher (3.3.1) waits for that store without a deadline: a node
whose master does not answer prints "master not ready" every 5 s forever, and
a node 0 whose MASTER address is not its own, or whose port is taken, waits
for a store nobody serves. So before it starts, :func:`check_master` proves
the master usable within ``connect_timeout`` seconds and names the address
when it is not: node 0 must own the address and find the port free; any
other node must reach it.
"""
from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass

from common.errors import InputError

DEFAULT_CONNECT_TIMEOUT = 60.0
# How long one connection attempt to the master may take before the next one.
_ATTEMPT_S = 5.0


@dataclass(frozen=True)
class Layout:
    """This node's share of a job.

    ``nproc``: training processes on this node (one per GPU with ``gpus``);
    ``master``: ``(ip, port)`` with the host resolved to IPv4, ``None`` on one
    node; ``master_text``: as given, for messages.
    """
    nnodes: int
    node_rank: int
    nproc: int
    gpus: str | None
    master: tuple[str, int] | None
    master_text: str | None
    connect_timeout: float

    @property
    def master_endpoint(self) -> str:
        return f"{self.master[0]}:{self.master[1]}"


def _integer(text: str, option: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{option} {text!r}: not an integer") from None
    if value < minimum:
        raise InputError(f"{option} {value}: must be >= {minimum}")
    return value


def _master(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or ":" in host:
        raise InputError(f"--master {text!r} (MASTER): expected HOST:PORT, e.g. 10.0.0.1:29500")
    port = _integer(port_text, f"--master {text} (MASTER): port", 1)
    if port > 65535:
        raise InputError(f"--master {text} (MASTER): port {port} is above 65535")
    try:
        ip = socket.gethostbyname(host)
    except OSError as err:
        raise InputError(f"--master {text} (MASTER): cannot resolve {host} ({err})") from None
    return ip, port


def parse_layout(nnodes: str = "1", node_rank: str = "0", master: str | None = None,
                 nproc: str | None = None, gpus: str | None = None,
                 connect_timeout: str | float = DEFAULT_CONNECT_TIMEOUT) -> Layout:
    """Check the values as given (strings from the command line or make variables) and
    return the layout; :class:`InputError` names the first option that is wrong."""
    n = _integer(nnodes, "--nnodes (NNODES)", 1)
    rank = _integer(node_rank, "--node-rank (NODE_RANK)", 0)
    if rank >= n:
        raise InputError(f"--node-rank {rank} (NODE_RANK): out of range for --nnodes {n} (NNODES); "
                         f"node ranks are 0..{n - 1}")
    if n > 1 and not master:
        raise InputError(f"--nnodes {n} (NNODES) needs --master HOST:PORT (MASTER): node 0's address "
                         "and a free port, the same on every node")
    if n == 1 and master:
        # Without this a MASTER meant for several machines would start an unrelated
        # one-node training on each of them.
        raise InputError(f"--master {master} (MASTER) is for several nodes: give --nnodes (NNODES) too")
    if gpus is not None and nproc is not None:
        raise InputError("--nproc (NPROC) and --gpus (GPUS) both given: GPUS starts one process per GPU")
    if gpus is not None:
        ids = gpus.split(",")
        if not all(i.strip().isdigit() for i in ids) or len(set(ids)) != len(ids):
            raise InputError(f"--gpus {gpus!r} (GPUS): expected distinct GPU numbers such as 0,1,2,3")
        count = len(ids)
    else:
        count = _integer(nproc, "--nproc (NPROC)", 1) if nproc is not None else 1
    try:
        timeout = float(connect_timeout)
    except ValueError:
        raise InputError(f"--connect-timeout {connect_timeout!r} (CONNECT_TIMEOUT): not a number") from None
    if not timeout > 0:
        raise InputError(f"--connect-timeout {connect_timeout} (CONNECT_TIMEOUT): must be > 0 seconds")
    return Layout(nnodes=n, node_rank=rank, nproc=count, gpus=gpus, master=_master(master) if master else None,
                  master_text=master, connect_timeout=timeout)


def _check_serves(layout: Layout) -> str:
    """Node 0: the master's address is this machine's and its port is free; returns the address."""
    ip, port = layout.master
    where = f"--master {layout.master_text} (MASTER)"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, 0))
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                raise InputError(f"{where}: {ip} is not an address of this machine; node 0 serves the "
                                 "rendezvous, so MASTER must be node 0's own address") from None
            raise InputError(f"{where}: cannot use {ip} ({err.strerror})") from None
    # Paddle's store listens on every interface of node 0, reusing addresses as this does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            raise InputError(f"{where}: port {port} is not free on this machine ({err.strerror}); "
                             "choose another port for every node") from None
    return ip


def _check_reaches(layout: Layout) -> str:
    """Any other node: connect to the master until it answers or ``connect_timeout`` passes
    (node 0 may start later); returns this node's address on the route to it."""
    ip, port = layout.master
    deadline = time.monotonic() + layout.connect_timeout
    last = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise InputError(f"--master {layout.master_text} (MASTER): no answer from {ip}:{port} within "
                             f"{layout.connect_timeout:g} s ({last}); start node 0 with the same MASTER, "
                             "check the address and that the port is open (CONNECT_TIMEOUT= waits longer)")
        try:
            with socket.create_connection((ip, port), timeout=min(remaining, _ATTEMPT_S)) as sock:
                return sock.getsockname()[0]
        except OSError as err:
            last = err.strerror or str(err) or type(err).__name__
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


def check_master(layout: Layout) -> str:
    """Prove the master usable from this node (see the module); returns the address this node
    gives the other nodes (Paddle's ``--host``). Raises :class:`InputError` naming MASTER."""
    return _check_serves(layout) if layout.node_rank == 0 else _check_reaches(layout)
