"""Dense or MoE is chosen from the global layer number, on every pipeline stage."""

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.testing.distributed import run_distributed


def _stage(rank, world):
    from megatron_dsv3.model import DeepSeekV3Model

    config = get_config("deepseek-v3-tiny", num_layers=4, first_k_dense_replace=3,
                        pipeline_model_parallel_size=2)
    model = DeepSeekV3Model(config, pre_process=rank == 0, post_process=rank == 1)
    return [(l.layer_number, l.is_moe_layer) for l in model.decoder.layers]


def test_each_pipeline_stage_builds_the_right_layers():
    stages = run_distributed(_stage, 2, megatron_parallel={"pipeline_model_parallel_size": 2})
    # layers 1-3 dense, layer 4 MoE: stage 0 holds 1-2, stage 1 holds 3-4
    assert stages == [[(1, False), (2, False)], [(3, False), (4, True)]]


def test_layer_forward_is_pre_norm_residual(single_rank_world):
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron_dsv3.transformer_layer import DeepSeekV3TransformerLayer

    config = get_config("deepseek-v3-tiny")
    spec = get_layer_spec(config)
    layer = DeepSeekV3TransformerLayer(config, spec.submodules, layer_number=1)
    assert not layer.is_moe_layer
    x = torch.randn(5, 2, config.hidden_size)
    out, context = layer(x)
    h = x + layer.self_attention(layer.input_layernorm(x))[0]
    ref = h + layer.mlp(layer.pre_mlp_layernorm(h))[0]
    assert context is None
    torch.testing.assert_close(out, ref)
    moe_layer = DeepSeekV3TransformerLayer(config, spec.submodules, layer_number=2)
    assert moe_layer.is_moe_layer


def test_the_final_norm_is_the_layers_rmsnorm(single_rank_world):
    """Megatron gives a layer spec's block its own LayerNormImpl (torch's RMSNorm here) as the
    final norm; ours is the layers' RMSNorm, with the float64 formula's values."""
    from megatron_dsv3.core.norm import RMSNorm
    from megatron_dsv3.model import build_model

    config = get_config("deepseek-v3-tiny")
    model = build_model(config)
    norm = model.decoder.final_layernorm
    assert type(norm) is RMSNorm and type(model.decoder.layers[0].input_layernorm) is RMSNorm
    assert norm.eps == config.layernorm_epsilon
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 2, config.hidden_size, dtype=torch.float64)
    want = norm.weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True)
                                                  + config.layernorm_epsilon)
    torch.testing.assert_close(norm(x.float()).double(), want, rtol=1e-5, atol=1e-6)
    # BF16: DeepSeek's formula bit for bit (statistics in float32, rounded, then the weight);
    # torch's RMSNorm, Megatron's default here, differs in ~1/4 of the elements by an ulp.
    xb, wb = (x * 3).bfloat16(), norm.weight.detach().bfloat16()
    deepseek = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True)
                                         + config.layernorm_epsilon)).bfloat16() * wb
    with torch.no_grad():
        norm.weight.data = wb
        assert torch.equal(norm(xb), deepseek)


def test_megatron_kv_cache_inference_is_refused(single_rank_world):
    """Megatron's inference context (its KV-cache decoding) was swallowed: a decode step then
    attended to its new tokens only and gave plausible wrong logits."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny", mtp_num_layers=None)).eval()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad(), pytest.raises(ValueError, match="inference_context.*InferenceEngine"):
        model(ids, torch.arange(6)[None], None,
              inference_context=StaticInferenceContext(max_batch_size=1, max_sequence_length=16))


def test_mtp_runs_without_position_ids(single_rank_world):
    """The decoder takes position_ids=None (positions 0..s-1); the MTP layer rolled None."""
    from megatron_dsv3.model import build_model

    torch.manual_seed(0)
    model = build_model(get_config("deepseek-v3-tiny"))
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        given = model(ids, torch.arange(8).expand(2, 8), None, labels=ids)
        none = model(ids, None, None, labels=ids)
    torch.testing.assert_close(none, given)
