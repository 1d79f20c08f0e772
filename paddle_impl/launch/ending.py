"""How a launched job ended, in one line: which rank failed first and why.

When one rank of a data-parallel job dies, the others do not stay blocked in
their collective: a rank on the same node is stopped by Paddle's launcher
(SIGTERM, then SIGKILL after 3 s), and a rank on another node fails within a
second on the broken connection (gloo: "Connection reset by peer", or a
``gloo::TimeoutException`` naming ``pair_rank``, which aborts the process).
Paddle's launcher then logs only the first failed process it happens to
look at and exits with that process's code, which is often a rank it
stopped itself. The records of :mod:`paddle_impl.launch.rank_exit` and the
worker logs tell the ranks apart:

- stopped: the launcher asked it to stop (its record says so);
- lost a peer: its log ends with gloo's error about another rank;
- failed: anything else that did not exit 0, the cause of the others: killed
  by a signal nobody sent from the launcher (SIGKILL, the out-of-memory
  killer), or exited with an error, whose last ``error:`` line or exception
  line is quoted.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

RECORD_GLOB = "rank.*.json"
_TAIL_BYTES = 65536
_GLOO_LOSS = re.compile(r"gloo.*(pair_rank|by peer|Connection|Broken pipe|TIMEOUT)", re.IGNORECASE)
_PAIR_RANK = re.compile(r"pair_rank\s*=\s*(\d+)")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?")


def read_records(log_dir: str | Path, launch_id: str | None) -> list[dict[str, Any]]:
    """This launch's rank records in ``log_dir`` (others, of earlier runs, are ignored), by rank."""
    records = []
    for path in Path(log_dir).glob(RECORD_GLOB):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # written atomically: a record that does not parse is not ours
        if record.get("launch_id") == launch_id:
            records.append(record)
    return sorted(records, key=lambda r: r["rank"])


def log_tail(path: Path, offset: int = 0) -> str:
    """The end of a worker log, from ``offset`` (where this run's output begins) on."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(offset, size - _TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


def _last_message(text: str) -> str | None:
    """The last ``error:`` line of our programs (one line already), else the last exception line
    of a traceback, shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return _short(line)
    return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ranks(ranks: Iterable[int]) -> str:
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


def classify(record: dict[str, Any], tail: str) -> tuple[str, str]:
    """``(kind, cause)`` of one rank: kind is ``ok``, ``stopped``, ``lost_peer`` or ``failed``."""
    if "exit_code" not in record:
        return "failed", "ended without a record of its exit (its parent process was killed)"
    if record["exit_code"] == 0:
        return "ok", "finished"
    if record.get("stopped_by_launcher"):
        return "stopped", f"stopped by the launcher ({record['stopped_by_launcher']})"
    loss = next((line for line in reversed(tail.splitlines()) if _GLOO_LOSS.search(line)), None)
    if loss is not None:
        peer = _PAIR_RANK.search(loss)
        whom = f"rank {peer.group(1)}" if peer else "another rank"
        return "lost_peer", f"lost the connection to {whom} (gloo: {_short(loss, 160)})"
    if record.get("signal"):
        return "failed", f"was killed by {record['signal']}"
    message = _last_message(tail)
    return "failed", f"exited with status {record['exit_code']}" + (f": {message}" if message else "")


def describe_ending(code: int, records: list[dict[str, Any]], log_dir: Path, offsets: dict[str, int],
                    launcher_log: Path | None, node: str = "") -> str | None:
    """One line on a job that ended with launcher exit status ``code``, or None when it succeeded.

    ``offsets``: worker log name -> its size before the launch; ``node``:
    ``" on node R"`` in a several-node job, for the messages.
    """
    if code == 0 and all(r.get("exit_code") == 0 for r in records):
        return None
    see = f"; see {launcher_log}" if launcher_log else ""
    if not records:
        return f"paddle.distributed.launch exited with status {code} before any training process started{see}"
    kinds: dict[str, dict[str, list[int]]] = {}
    logs: dict[int, Path] = {}
    for record in records:
        logs[record["rank"]] = log_dir / record["log"]
        kind, cause = classify(record, log_tail(logs[record["rank"]], offsets.get(record["log"], 0)))
        kinds.setdefault(kind, {}).setdefault(cause, []).append(record["rank"])
    others = sum(len(r) for kind in ("stopped", "lost_peer") for r in kinds.get(kind, {}).values())
    if "failed" in kinds:
        failed = kinds["failed"]
        first = min(r for ranks in failed.values() for r in ranks)
        parts = "; ".join(f"{_ranks(ranks)}{node} {cause}" for cause, ranks in failed.items())
        rest = f"; {others} other rank(s){node} stopped after it" if others else ""
        return f"{parts} (log {logs[first]}){rest}"
    if "lost_peer" in kinds:
        parts = "; ".join(f"{_ranks(ranks)}{node} {cause}" for cause, ranks in kinds["lost_peer"].items())
        first = min(r for ranks in kinds["lost_peer"].values() for r in ranks)
        return (f"{parts}: a rank on another node failed first, and that node's launcher names it "
                f"(log {logs[first]})")
    if "stopped" in kinds:
        ranks = sorted(r for ranks in kinds["stopped"].values() for r in ranks)
        return f"{_ranks(ranks)}{node} stopped by the launcher before finishing (exit status {code}){see}"
    return f"paddle.distributed.launch exited with status {code} although every rank finished{see}"
