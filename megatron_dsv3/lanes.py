"""Lanes and step traces: how two concurrent streams of work in one process keep their
collectives apart, and what a step did, when.

A *lane* is one of two streams of collectives a rank issues concurrently: whatever issues
collectives (the expert dispatcher's all-to-alls) keeps one process group per lane over the same
ranks and uses the calling thread's lane (`current_lane()`). Collectives on one group must be
issued in the same order on all its members; with one lane per stream the order on each lane is
that stream's order, which every rank shares, so two threads can each keep their transfers in
flight while the other computes. Users:

- training (DualPipe's F&B pairs): forward passes on lane 0, backward passes on lane 1
  (FORWARD_LANE, BACKWARD_LANE), set by the pipeline executor around each pass;
- inference (two-micro-batch decoding): micro-batch i on lane i.

The lane is per thread and set only through `on_lane(lane)`, a context manager its caller owns;
`run_on_two_lanes` runs two callables together, one per lane.

`StepTrace` records one step's timeline: operations (F, B, attention, ... with their lane) and
the all-to-all transfers the dispatcher reports (issue, completion and wait times, by lane). A
trace records while its `recording()` block runs (process-wide: the step's helper threads and
autograd's threads report into it too); outside one, `StepTrace.op` and `StepTrace.transfer` do
nothing. This module imports nothing of ours: dispatch, pipeline and inference all build on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from typing import Callable, Dict, List, Optional

LANES = 2
FORWARD_LANE, BACKWARD_LANE = 0, 1

_LANE = threading.local()


def current_lane() -> int:
    """The calling thread's lane (0 outside any `on_lane` block)."""
    return getattr(_LANE, "value", 0)


class on_lane:
    """`with on_lane(lane):` collectives this thread issues inside the block go on `lane` (0 or
    1). (A class, not a generator: the pipeline enters one per forward and backward pass.)"""

    __slots__ = ("lane", "saved")

    def __init__(self, lane: int):
        if lane not in range(LANES):
            raise ValueError(f"lane {lane} is invalid: allowed values are 0..{LANES - 1}")
        self.lane = lane

    def __enter__(self) -> None:
        self.saved = getattr(_LANE, "value", 0)
        _LANE.value = self.lane

    def __exit__(self, *exc) -> bool:
        _LANE.value = self.saved
        return False


def run_on_two_lanes(on_lane0: Callable[[], None], on_lane1: Callable[[], None],
                     name: str = "dsv3-lane0") -> None:
    """Run `on_lane0` in a helper thread (lane 0) and `on_lane1` here (lane 1), together. An
    exception in either is raised here after both have finished."""
    errors: List[BaseException] = []

    def first() -> None:
        try:
            with on_lane(0):
                on_lane0()
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)

    # the helper thread runs in a copy of this thread's context (context variables, e.g. the
    # engine's deferral of non-finite-logits errors, hold for both lanes)
    worker = threading.Thread(target=contextvars.copy_context().run, args=(first,), name=name,
                              daemon=True)
    worker.start()
    try:
        with on_lane(1):
            on_lane1()
    finally:
        worker.join()
    if errors:
        raise errors[0]


class StepTrace:
    """Timeline of one step on this rank: `ops` ({"kind", chunk, mb, lane, pair, start, end})
    and `transfers` (all-to-all records: stage, pass, lane, start, end, waited), times in seconds
    from the start of `recording()`."""

    _recording: Optional["StepTrace"] = None  # the trace whose recording() block is running

    def __init__(self):
        self.ops: List[Dict] = []
        self.transfers: List[Dict] = []
        self.t0 = 0.0

    @contextlib.contextmanager
    def recording(self):
        """Record into this trace while the block runs; times become relative to its start."""
        self.t0 = time.perf_counter()
        saved, StepTrace._recording = StepTrace._recording, self
        try:
            yield self
        finally:
            StepTrace._recording = saved
            for record in self.ops + self.transfers:
                for key in ("start", "end", "waited"):
                    if key in record:
                        record[key] -= self.t0

    @contextlib.contextmanager
    def timing(self, kind: str, chunk: int, mb: int, lane: int, pair: bool):
        """Record the block as one operation of this trace."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ops.append({"kind": kind, "chunk": chunk, "mb": mb, "lane": lane,
                             "pair": pair, "start": start, "end": time.perf_counter()})

    @staticmethod
    def op(kind: str, chunk: int, mb: int, lane: int, pair: bool):
        """Record the block as one operation of the trace being recorded, if any."""
        trace = StepTrace._recording
        if trace is None:
            return contextlib.nullcontext()
        return trace.timing(kind, chunk, mb, lane, pair)

    @staticmethod
    def is_recording() -> bool:
        return StepTrace._recording is not None

    @staticmethod
    def transfer(record: Dict) -> None:
        """Add a transfer record (perf_counter times) to the trace being recorded, if any."""
        trace = StepTrace._recording
        if trace is not None:
            trace.transfers.append(record)

    def overlap_seconds(self) -> float:
        """Seconds during which a transfer of one lane was in flight (issued, not yet complete)
        while a paired operation of the other lane was running, summed over transfers. Zero when
        the pair's halves run one after the other."""
        total = 0.0
        for t in self.transfers:
            other = [o for o in self.ops if o["lane"] != t.get("lane") and o["pair"]]
            for o in other:
                total += max(0.0, min(t["end"], o["end"]) - max(t["start"], o["start"]))
        return total

    def to_json(self) -> Dict:
        return {"ops": self.ops, "transfers": self.transfers,
                "overlap_seconds": self.overlap_seconds()}
