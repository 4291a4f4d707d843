"""Non-finite logits end generation with an error naming the step, the request and the position,
never with a token chosen from NaN (which argmax would call token 0, often a stop token)."""

import dataclasses
import os

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.generate import main
from megatron_dsv3.inference import InferenceEngine, Request
from megatron_dsv3.inference.sampling import (
    NonFiniteLogitsError,
    SamplingParams,
    check_finite_logits,
)
from megatron_dsv3.model import build_model
from megatron_dsv3.training.trainer import TrainArgs


@pytest.fixture(scope="module")
def model(single_rank_world):
    torch.manual_seed(0)
    return build_model(get_config("deepseek-v3-tiny", init_method_std=0.2)).eval()


@pytest.fixture
def nan_model(model):
    """The model with NaN output-layer weights (restored afterwards)."""
    weight = model.output_layer.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("nan"))
    yield model
    with torch.no_grad():
        weight.copy_(saved)


def test_check_names_the_first_bad_request_and_position():
    logits = torch.zeros(3, 2, 5)
    check_finite_logits(logits, [4, 7, 9], [10, 20, 30], "decode step 3")
    logits[1, 1, 2] = float("inf")
    logits[2, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"^decode step 3: request 7 has non-finite "
                                                   r"logits \(inf\) at position 21;"):
        check_finite_logits(logits, [4, 7, 9], [10, 20, 30], "decode step 3")


@pytest.mark.parametrize("speculative", [False, True])
def test_nan_weights_raise_at_prefill_instead_of_a_stop_token(nan_model, speculative):
    engine = InferenceEngine(nan_model, block_size=8)
    requests = [Request([5, 6, 7], 4, stop_token_ids=[0])]
    with pytest.raises(NonFiniteLogitsError, match=r"^prefill: request 0 has non-finite logits "
                                                   r"\(nan\) at position 2;"):
        engine.generate(requests, speculative=speculative)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks  # blocks given back


@pytest.mark.parametrize("speculative,sampling", [
    (False, SamplingParams()), (False, SamplingParams(temperature=0.8, seed=1)),
    (True, SamplingParams())])
def test_nan_logits_in_a_decode_step_name_the_step_request_and_position(model, speculative,
                                                                        sampling):
    engine = InferenceEngine(model, block_size=8)
    forward, calls = engine.decoder.forward, []

    def second_request_breaks_on_its_second_decode(chunks):
        logits, hidden = forward(chunks)
        calls.append(len(chunks))
        if len(chunks) == 2 and calls.count(2) == 2:  # decode step 1 of both requests
            logits[1, -1, 3] = float("nan")
        return logits, hidden

    engine.decoder.forward = second_request_breaks_on_its_second_decode
    requests = [Request([1, 2, 3], 6, sampling), Request([4, 5, 6, 7, 8], 6, sampling)]
    with pytest.raises(NonFiniteLogitsError, match=r"^decode step 1: request 1 has non-finite "
                                                   r"logits \(nan\) at position"):
        engine.generate(requests, speculative=speculative)


def test_generate_command_line_exits_2_on_a_nan_model(tmp_path, capsys, nan_model):
    os.makedirs(tmp_path / "checkpoint")
    args = TrainArgs(seed=0, config_overrides={"init_method_std": 0.2})
    torch.save({"models": [nan_model.state_dict()], "optimizer": {}, "step": 1,
                "args": dataclasses.asdict(args), "world_size": 1},
               tmp_path / "checkpoint" / "rank0.pt")
    assert main(["--checkpoint", str(tmp_path), "--prompt", "def", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prefill: request 0 has non-finite logits (nan) at position 2")
    assert "Traceback" not in err
