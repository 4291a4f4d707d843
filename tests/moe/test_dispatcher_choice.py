"""The token dispatcher follows config.dsv3_dispatcher; bad choices fail at configuration time."""

import pytest

from megatron_dsv3.configs import get_config
from megatron_dsv3.dispatch import NodeAwareDispatcher
from megatron_dsv3.dispatch.base import LocalDispatcher
from megatron_dsv3.dispatch.flat import FlatAllToAllDispatcher
from megatron_dsv3.layer_specs import dispatcher_class


class _Group:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


@pytest.mark.parametrize("choice,ep,expected", [
    ("node-aware", 4, NodeAwareDispatcher), ("flat", 4, FlatAllToAllDispatcher),
    ("node-aware", 1, LocalDispatcher), ("flat", 1, LocalDispatcher), ("local", 1, LocalDispatcher)])
def test_choice_by_config(choice, ep, expected):
    config = get_config("deepseek-v3-tiny", dsv3_dispatcher=choice)
    assert dispatcher_class(config, _Group(ep) if ep > 1 else None) is expected


def test_bad_choices_name_the_field_and_allowed_values():
    with pytest.raises(ValueError, match=r"dsv3_dispatcher='deepep' is invalid: allowed values "
                                         r"are node-aware, flat, local"):
        get_config("deepseek-v3-tiny", dsv3_dispatcher="deepep")
    with pytest.raises(ValueError, match=r"dsv3_dispatcher='local' .* expert_model_parallel_size=1"):
        get_config("deepseek-v3-tiny", dsv3_dispatcher="local", expert_model_parallel_size=4)
