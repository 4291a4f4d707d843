"""Lanes and step traces (megatron_dsv3.lanes): a trace records only inside its recording()
block, from every thread of the step, and nothing else changes state outside a block."""

from megatron_dsv3.lanes import StepTrace, current_lane, on_lane, run_on_two_lanes


def test_a_trace_records_only_inside_its_recording_block_from_both_lanes():
    trace = StepTrace()
    with StepTrace.op("F", 0, 0, 0, False):  # nothing is recording: dropped
        StepTrace.transfer({"stage": "dispatch_inter", "start": 0.0, "end": 0.0})
    assert not StepTrace.is_recording()

    def step(lane):
        def run():
            with StepTrace.op("attn", 0, lane, current_lane(), True):
                StepTrace.transfer({"stage": "dispatch_inter", "lane": current_lane(),
                                    "start": 0.0, "end": 0.0})
        return run

    with trace.recording():
        assert StepTrace.is_recording()
        run_on_two_lanes(step(0), step(1))
    assert not StepTrace.is_recording()
    assert sorted(o["lane"] for o in trace.ops) == [0, 1]
    assert sorted(t["lane"] for t in trace.transfers) == [0, 1]


def test_timing_records_into_its_own_trace_and_lanes_restore():
    trace = StepTrace()
    with on_lane(1):
        with trace.timing("B", 1, 3, current_lane(), False):
            pass
    assert current_lane() == 0
    assert [(o["kind"], o["chunk"], o["mb"], o["lane"]) for o in trace.ops] == [("B", 1, 3, 1)]
