"""A worker process that dies on one item does not stop the run (native decoders can crash)."""

from __future__ import annotations

import faulthandler
import os
import signal
from collections.abc import Sequence

from fedrad.client.dicom.parallel import map_chunks

POISON = 37


def _square_or_die(items: Sequence[int]) -> list[int]:
    out = []
    for i in items:
        if i == POISON:
            faulthandler.disable()  # no crash dump in the test output
            os.kill(os.getpid(), signal.SIGSEGV)  # what a crashing native decoder does
        out.append(i * i)
    return out


def test_an_item_that_kills_its_worker_gets_its_crashed_result_and_the_rest_complete() -> None:
    items = list(range(100))

    chunks = list(map_chunks(_square_or_die, items, workers=2, description="x", progress=False, chunk_size=8,
                             min_parallel=10, isolate=lambda i: -1))

    results = sorted(r for chunk in chunks for r in chunk)
    assert len(results) == 100
    assert results.count(-1) == 1
    assert sorted(r for r in results if r >= 0) == sorted(i * i for i in items if i != POISON)
