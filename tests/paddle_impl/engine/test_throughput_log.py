"""The training log line: TIPC's throughput figures averaged over the iterations since the last line."""
from __future__ import annotations

from paddle_impl.engine.report import ThroughputLog


def record(i: int, data_time: float, time: float) -> dict:
    return {"iter": i, "epoch": 1, "loss": 1.5, "lr": 0.01, "data_time": data_time, "time": time, "eta": "0:00:01"}


def test_a_line_every_interval_and_at_the_end_with_the_averages_since_the_last():
    log = ThroughputLog(interval=2, total_iters=5)
    assert log.add(record(1, 0.1, 1.0), 2) is None
    line = log.add(record(2, 0.3, 3.0), 2)
    assert "iter 2/5" in line and "avg_reader_cost: 0.20000 s" in line and "avg_batch_cost: 2.00000 s" in line
    assert "avg_samples: 2," in line and "avg_ips: 1.00000 samples/s" in line
    assert log.add(record(3, 0.0, 0.5), 1) is None
    assert log.add(record(4, 0.0, 0.5), 1) is not None
    last = log.add(record(5, 0.2, 4.0), 2)
    assert "iter 5/5" in last and "avg_reader_cost: 0.20000 s" in last and "avg_ips: 0.50000 samples/s" in last
    assert log.flush() is None
