"""On identical weights, the FP8 recipe moves the held-out loss of a briefly trained tiny model by
less than FIDELITY_BOUND (bench/fp8_fidelity.py measures the same thing on larger runs), and the
bound catches per-tensor instead of per-tile scaling where that matters: under a massive
activation.

The model: deepseek-v3-tiny (dense MLP width FFN_HIDDEN) in FP32, trained TRAIN_STEPS AdamW steps
on the start of the corpus, evaluated on standard-library files the trainer never reads
(bench/fp8_runs.heldout_batches). The GEMMs of every module that owns one (MLA's and the MLPs'
linears, the routed experts, MTP's eh_proj) are swapped for the evaluation; the weights stay the
same tensors.

What the bound cannot see at this size (tried, docs/benchmarks.md, issue 16): per-tensor scales
on the model as trained (its activations span less than E4M3's range, so one scale per tensor
rounds like one per tile), and FP32 promotion dropped (every GEMM here has K <= 160, one or two
128-wide promotion intervals; a 13-bit or BF16 accumulator over the whole K moved the loss by
2.6e-4 to 3.4e-4, the recipe by 3.1e-4). The promotion matters at DeepSeek-V3's K of 2048 to
18432, beyond a test's budget.
"""

import contextlib
import importlib.util
import math
import os

import pytest
import torch

from megatron_dsv3.core.gemm import Gemm
from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm
from megatron_dsv3.fp8.quant import AMAX_FLOOR, quantize_per_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("fp8_runs", os.path.join(ROOT, "bench",
                                                                         "fp8_runs.py"))
fp8_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp8_runs)

TRAIN_STEPS, BATCH, SEQ = 40, 8, 64
HELDOUT_SEQUENCES = 64
# the dense MLP's width: the preset's 160 less 31, so that neuron 128 has the last 1x128 tile of
# fc2's input and the last 128x128 block of its weight to itself (massive_activation)
FFN_HIDDEN = 129
# |FP8 - FP32| / FP32 of the held-out loss: the identical-weights target (0.1%). Measured
# on this model 1.7e-4 (float32 scales) and 3.7e-4 (power-of-2 scales) with Python 3.11's standard
# library as data, 2.1e-4 and 3.2e-5 with 3.12's; under the planted massive activation per-tile
# scaling 1.9e-5 to 3.9e-4, per-tensor 0.13 to 0.57
FIDELITY_BOUND = 1e-3


class PerTensorFp8Gemm(Fp8BlockwiseGemm):
    """The recipe broken: one scale per tensor instead of 1x128 tiles and 128x128 blocks."""

    name = "fp8-per-tensor"

    def tiles(self, t, floor=AMAX_FLOOR):
        if t.numel() == 0:  # an expert without tokens
            return t.float()
        q, scale = quantize_per_tensor(t, pow2_scales=self.pow2_scales)
        return q.float() * scale

    def blocks(self, w):
        return self.tiles(w)


# -- model, data, evaluation -----------------------------------------------------------------------
def gemm_owners(model):
    return [m for m in model.modules() if isinstance(getattr(m, "gemm", None), Gemm)]


@contextlib.contextmanager
def gemms_swapped(model, gemm):
    """Every GEMM-owning module of `model` runs `gemm` (the same weights) while active."""
    owners = gemm_owners(model)
    saved = [m.gemm for m in owners]
    for m in owners:
        m.gemm = gemm
    try:
        yield
    finally:
        for m, g in zip(owners, saved):
            m.gemm = g


@pytest.fixture(scope="module")
def trained_tiny(single_rank_world):
    """(model, held-out batches, FP32 held-out loss): deepseek-v3-tiny, FP32, TRAIN_STEPS steps on
    the corpus start."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balancing import update_expert_biases

    torch.manual_seed(0)
    config = get_config("deepseek-v3-tiny", ffn_hidden_size=FFN_HIDDEN)
    model = build_model(config)
    train = fp8_runs.heldout_batches(TRAIN_STEPS * BATCH, SEQ, BATCH, train_bytes=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    model.train()
    for batch in train:
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        update_expert_biases([model], config.moe_router_bias_update_rate)
    model.pop_mtp_losses()
    batches = fp8_runs.heldout_batches(HELDOUT_SEQUENCES, SEQ, BATCH)
    return model, batches, fp8_runs.heldout_loss(model, batches)


def relative_loss_change(trained_tiny, gemm) -> float:
    """|loss with `gemm` - FP32 loss| / FP32 loss, same weights, same held-out batches."""
    model, batches, reference = trained_tiny
    with gemms_swapped(model, gemm):
        return abs(fp8_runs.heldout_loss(model, batches) - reference) / reference


def test_training_got_somewhere_and_every_gemm_owner_is_swapped(trained_tiny):
    model, _, reference = trained_tiny
    # uniform over 256 bytes is ln 256 = 5.55; the briefly trained model predicts bytes
    assert reference < 0.75 * math.log(256)
    # 3 layers: MLA's 5 linears + proj each, dense MLP / shared expert fc1+fc2, routed experts;
    # MTP: eh_proj and its layer
    assert len(gemm_owners(model)) >= 30


@pytest.mark.parametrize("pow2_scales", [False, True], ids=["float32-scales", "pow2-scales"])
def test_fp8_recipe_keeps_heldout_loss_of_identical_weights_within_bound(trained_tiny,
                                                                        pow2_scales):
    assert relative_loss_change(trained_tiny, Fp8BlockwiseGemm(pow2_scales)) < FIDELITY_BOUND


@contextlib.contextmanager
def massive_activation(model, batches, neuron=FFN_HIDDEN - 1, gain=300.0):
    """A massive activation planted the way large LLMs grow them (Sun et al., 2024: a few tokens
    whose MLP activation is orders of magnitude above the rest): neuron `neuron` of the dense
    layer's MLP fires for one byte (the rarest of the first held-out batch) ~10^6 x the median
    activation. Its fc1 gate and up rows become gain x the unit direction separating that byte's
    fc1 inputs from the others'; its fc2 column is divided by gain^2 (the FP32 held-out loss moves
    by 1-2%: the neuron's own role is replaced). The neuron owns the last 1x128 tile of fc2's input
    and the last 128x128 block of fc2's weight (FFN_HIDDEN = 129), as an outlier nearly does at
    DeepSeek-V3's sizes (one tile of 144 along fc2's K); at the preset's 160 it would share them
    with a fifth of the row. Weights restored on exit."""
    mlp = model.decoder.layers[0].mlp
    fc1, fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    hidden = fc2.shape[1]  # fc1 rows: [gate (hidden); up (hidden)]
    inputs = []
    hook = mlp.linear_fc1.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    fp8_runs.heldout_loss(model, batches[:1])
    hook.remove()
    tokens = batches[0]["tokens"].t()  # [s, b], Megatron's layout of inputs[0]
    counts = torch.bincount(tokens.flatten(), minlength=256).float()
    byte = int(torch.where(counts > 0, counts, math.inf).argmin())
    selected = tokens == byte
    direction = inputs[0][selected].mean(0) - inputs[0][~selected].mean(0)
    saved = fc1.detach().clone(), fc2.detach().clone()
    with torch.no_grad():
        fc1[neuron] = fc1[hidden + neuron] = gain * direction / direction.norm()
        fc2[:, neuron] /= gain ** 2
    try:
        yield
    finally:
        with torch.no_grad():
            fc1.copy_(saved[0])
            fc2.copy_(saved[1])


@pytest.mark.parametrize("gemm, within_bound", [
    (Fp8BlockwiseGemm(False), True), (Fp8BlockwiseGemm(True), True),
    (PerTensorFp8Gemm(False), False), (PerTensorFp8Gemm(True), False)],
    ids=["per-tile", "per-tile-pow2", "per-tensor", "per-tensor-pow2"])
def test_bound_fails_per_tensor_scaling_and_holds_per_tile_under_a_massive_activation(
        trained_tiny, gemm, within_bound):
    model, batches, _ = trained_tiny
    with massive_activation(model, batches):
        reference = fp8_runs.heldout_loss(model, batches)
        change = relative_loss_change((model, batches, reference), gemm)
    assert (change < FIDELITY_BOUND) == within_bound, change
