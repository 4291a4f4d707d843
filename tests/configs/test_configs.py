"""Presets, validation errors that name the field, and the parameter counts of the built model."""

import pytest
import torch

from megatron_dsv3.configs import get_config, is_moe_layer, validate_config


def test_deepseek_v3_preset_is_the_671b_architecture():
    c = get_config("deepseek-v3")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.vocab_size) == (61, 7168, 128, 129280)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert c.moe_layer_freq == [0] * 3 + [1] * 58
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_router_num_groups,
            c.moe_router_group_topk) == (256, 8, 8, 4)
    assert c.moe_router_topk_scaling_factor == 2.5 and c.mtp_num_layers == 1
    assert c.params_dtype == torch.bfloat16


def test_tiny_preset_keeps_the_structure():
    c = get_config("deepseek-v3-tiny")
    assert c.moe_layer_freq[0] == 0 and all(c.moe_layer_freq[1:])
    assert (c.num_moe_experts, c.moe_router_num_groups, c.moe_router_group_topk,
            c.moe_router_topk, c.mtp_num_layers) == (16, 4, 2, 4, 1)
    d = get_config("deepseek-v3-tiny", num_layers=5, first_k_dense_replace=2)
    assert d.moe_layer_freq == [0, 0, 1, 1, 1]
    assert [is_moe_layer(d, n) for n in range(1, 7)] == [False, False, True, True, True, True]


@pytest.mark.parametrize("overrides,field", [
    ({"moe_router_num_groups": 3}, "moe_router_num_groups"),  # 16 experts not divisible by 3
    ({"moe_router_group_topk": 5}, "moe_router_group_topk"),  # more than the 4 groups
    ({"moe_router_topk": 9}, "moe_router_topk"),  # 2 kept groups hold only 8 experts
    # a bool is no count: True passed `isinstance(x, int)` and failed in torch.topk's forward
    ({"moe_router_topk": True}, "moe_router_topk"),
    ({"moe_router_group_topk": True}, "moe_router_group_topk"),
    ({"moe_router_num_groups": True}, "moe_router_num_groups"),
    # a type listed twice: its coefficient was the last one's (Megatron reads the first)
    ({"moe_router_load_balancing_type": ["seq_aux_loss", "aux_loss", "seq_aux_loss"],
      "moe_aux_loss_coeff": [1e-4, 1e-3, 0.5]}, "moe_router_load_balancing_type"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"q_lora_rank": -4}, "q_lora_rank"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"moe_ffn_hidden_size": 0}, "moe_ffn_hidden_size"),
    ({"qk_pos_emb_head_dim": 7}, "qk_pos_emb_head_dim"),
    ({"num_attention_heads": 3, "tensor_model_parallel_size": 2}, "tensor_model_parallel_size"),
    ({"expert_model_parallel_size": 3}, "expert_model_parallel_size"),
    ({"moe_router_score_function": "softmax"}, "moe_router_score_function"),
    ({"moe_router_bias_update_rate": -1.0}, "moe_router_bias_update_rate"),
])
def test_bad_configurations_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        get_config("deepseek-v3-tiny", **overrides)


def test_unknown_preset_and_field_list_allowed_values():
    with pytest.raises(ValueError, match="deepseek-v3-tiny"):
        get_config("deepseek-v4")
    with pytest.raises(ValueError, match="not_a_field"):
        get_config("deepseek-v3-tiny", not_a_field=1)


def test_validation_also_runs_on_plain_megatron_configs():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    cfg = MLATransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               num_moe_experts=8, moe_router_topk=2, moe_router_num_groups=2,
                               moe_router_group_topk=1, moe_router_score_function="sigmoid",
                               moe_ffn_hidden_size=16, kv_lora_rank=16, q_lora_rank=16,
                               qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8,
                               add_bias_linear=False, gated_linear_unit=True,
                               activation_func=torch.nn.functional.silu)  # DeepSeek's layers
    validate_config(cfg)
    cfg.moe_router_topk = 5  # the one kept group holds 4 experts
    with pytest.raises(ValueError, match="moe_router_topk"):
        validate_config(cfg)


def test_deepseek_v3_counts_671b_and_37b_activated_on_the_meta_device(single_rank_world):
    """Counted from the model built on the meta device, not from a formula."""
    from megatron_dsv3.model import build_model

    config = get_config("deepseek-v3", perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        model = build_model(config)
    total = mtp = routed = 0
    for name, p in model.named_parameters():
        assert p.device.type == "meta"
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if ".experts.fc" in name:
            routed += p.numel()
    assert abs(total - 671e9) / 671e9 < 0.005, total
    # per token: everything but the routed experts, plus 8 of 256 routed experts per MoE layer
    activated = total - routed + routed * config.moe_router_topk / config.num_moe_experts
    assert 36.7e9 <= activated <= 37.6e9, activated
    # the MTP module (its own layer, norms and projection; embedding and head are shared)
    assert abs(mtp - 11.5e9) / 11.5e9 < 0.02, mtp
