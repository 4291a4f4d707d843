"""Traffic counters: bytes are filed by link, totals sum over layers, reset clears, and
dispatch_counters finds every dispatcher of a model by module name."""

import torch

from megatron_dsv3.dispatch.counters import TrafficCounters, dispatch_counters


def test_bytes_filed_by_link_and_totals_sum_layers():
    a, b = TrafficCounters(), TrafficCounters()
    a.add_sent([10, 20, 30, 40], ["self", "intra", "inter", "inter"])
    a.tokens, a.max_nodes_per_token, a.tokens_over_node_limit = 5, 3, 1
    a.add_tokens_per_expert([1, 2])
    a.add_tokens_per_expert([3, 0])
    b.add_sent([7, 9], ["inter", "intra"])
    b.tokens, b.max_nodes_per_token = 4, 2
    assert (a.inter_node_bytes, a.intra_node_bytes) == (70, 20)
    assert a.tokens_per_expert.tolist() == [4, 2]
    t = TrafficCounters.total([a, b])
    assert (t.inter_node_bytes, t.intra_node_bytes, t.tokens) == (77, 29, 9)
    assert (t.max_nodes_per_token, t.tokens_over_node_limit) == (3, 1)
    a.reset()
    assert a == TrafficCounters()


def test_dispatch_counters_finds_dispatchers_by_module_name():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dispatcher = type("D", (), {"counters": TrafficCounters()})()

    model = torch.nn.ModuleDict({"a": Layer(), "b": torch.nn.Linear(2, 2), "c": Layer()})
    found = dispatch_counters(model)
    assert list(found) == ["a", "c"]
    assert found["a"] is model["a"].dispatcher.counters
    assert list(dispatch_counters([model, Layer()])) == ["0.a", "0.c", "1."]
