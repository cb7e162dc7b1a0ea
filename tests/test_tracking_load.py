"""A bounded load on the tracking server: 8 writers flushing 20 epochs of per-batch points each,
as training does, while 2 readers poll; every point lands and every read succeeds.

benchmarks/tracking_load.py at full size (422 batches an epoch) gives the figures in
benchmarks/RESULTS.md; here 29 batches an epoch, and no timing is asserted (only reported).
"""

from __future__ import annotations

import sys

import pytest
from helpers import ROOT, clean_env, sh

pytestmark = pytest.mark.slow
WRITERS, EPOCHS, BATCHES = 8, 20, 29


def test_eight_writers_and_two_readers_lose_no_point_and_no_read(server: str) -> None:
    script = ROOT / "benchmarks/tracking_load.py"
    command = [sys.executable, str(script), "--uri", server, "--batches", str(BATCHES)]
    command += ["--writers", str(WRITERS), "--epochs", str(EPOCHS), "--read-interval", "0.1"]
    out = sh(*command, cwd=ROOT, env=clean_env(), timeout=300).stdout  # exit 0: nothing missing
    print(out)  # the figures, for -s
    lines = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [line.strip("| ").split(" | ") for line in lines]
    header, row = rows[0], dict(zip(rows[0], rows[-1], strict=True))
    assert len(rows) == 2 and header[0] == "store" and row["store"] == "server", out
    total = WRITERS * EPOCHS * (2 * BATCHES + 4)
    assert row["points per flush"] == str(2 * BATCHES + 4)
    assert row["total points"] == row["points landed"] == f"{total:,}", row
    ok, failed = (int(n) for n in row["reads ok / failed"].split(" / "))
    assert failed == 0 and ok >= 10, row  # the readers read all along, and never in vain
    p50, p99 = float(row["flush p50 ms"]), float(row["flush p99 ms"])
    assert 0 < p50 <= p99, row
    assert "FAILED" not in out
