"""Topology arithmetic: ranks per node from the environment, EP groups split into node blocks, the
node limit of grouped routing — bad values raise ValueError naming the variable or field."""

import pytest

from megatron_dsv3.dispatch.topology import ENV_RANKS_PER_NODE, node_layout, node_limit, ranks_per_node


def test_ranks_per_node_prefers_override_then_local_world_size(monkeypatch):
    monkeypatch.delenv(ENV_RANKS_PER_NODE, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert ranks_per_node() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert ranks_per_node() == 8
    monkeypatch.setenv(ENV_RANKS_PER_NODE, "2")
    assert ranks_per_node() == 2
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(ENV_RANKS_PER_NODE, bad)
        with pytest.raises(ValueError, match=ENV_RANKS_PER_NODE):
            ranks_per_node()


def test_node_layout_of_whole_and_strided_groups():
    assert node_layout(list(range(8)), 2) == (2, 4)  # 4 nodes of 2
    assert node_layout(list(range(8)), 8) == (8, 1)  # one node
    assert node_layout([0, 8, 16, 24], 8) == (1, 4)  # one EP rank on each of 4 nodes
    assert node_layout([4, 5, 6, 7], 8) == (4, 1)
    with pytest.raises(ValueError, match=ENV_RANKS_PER_NODE):
        node_layout(list(range(8)), 3)  # nodes of 3, 3, 2
    with pytest.raises(ValueError, match="same number of EP ranks"):
        node_layout([0, 1, 8], 8)
    with pytest.raises(ValueError, match="node after node"):
        node_layout([0, 8, 1, 9], 8)


def test_node_limit_is_kept_groups_capped_by_nodes():
    assert node_limit(8, 8, 4) == 4  # DeepSeek-V3: 8 nodes, one group each, M = 4
    assert node_limit(4, 8, 4) == 4  # two groups per node: 4 groups can still be 4 nodes
    assert node_limit(4, 8, 2) == 2
    assert node_limit(4, 8, 8) == 4  # group-limited routing off: every node
    assert node_limit(1, None, None) == 1
    with pytest.raises(ValueError, match=r"moe_router_num_groups=6 .*multiples of 4"):
        node_limit(4, 6, 2)
    with pytest.raises(ValueError, match="moe_router_num_groups=None"):
        node_limit(2, None, None)
