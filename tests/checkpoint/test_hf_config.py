"""config_from_hf / config_to_hf: every HF field lands in the Megatron field that holds it, and a
config the model cannot hold is refused naming the HF field."""

import copy
import math
import warnings

import pytest
import torch

from megatron_dsv3.checkpoint.hf_config import config_from_hf, config_to_hf
from megatron_dsv3.configs import get_config

# deepseek-ai/DeepSeek-V3's config.json (the fields that describe the model)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}

ARCHITECTURE = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "q_lora_rank",
                "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
                "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                "moe_router_topk", "moe_router_num_groups", "moe_router_group_topk",
                "moe_router_topk_scaling_factor", "moe_layer_freq", "layernorm_epsilon",
                "vocab_size", "max_position_embeddings", "rope_type", "rotary_base",
                "rotary_scaling_factor", "original_max_position_embeddings", "beta_fast",
                "beta_slow", "mscale", "mscale_all_dim", "mtp_num_layers"]


def test_deepseek_v3_config_json_gives_the_671b_preset():
    ours = config_from_hf(DEEPSEEK_V3)
    preset = get_config("deepseek-v3")
    for field in ARCHITECTURE:
        assert getattr(ours, field) == getattr(preset, field), field
    assert ours.params_dtype == torch.bfloat16 and ours.init_method_std == 0.02


def test_each_hf_field_lands_in_its_megatron_field():
    hf = dict(DEEPSEEK_V3, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
              num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
              kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
              n_routed_experts=12, n_shared_experts=2, num_experts_per_tok=3, n_group=3,
              topk_group=2, routed_scaling_factor=1.5, first_k_dense_replace=2, rms_norm_eps=1e-5,
              vocab_size=300, max_position_embeddings=512, num_nextn_predict_layers=2,
              rope_theta=5000.0, initializer_range=0.01,
              rope_scaling={"type": "yarn", "factor": 8, "original_max_position_embeddings": 64,
                            "beta_fast": 16, "beta_slow": 2, "mscale": 0.707,
                            "mscale_all_dim": 0.5})
    c = config_from_hf(hf, dtype=torch.float32)
    assert (c.hidden_size, c.ffn_hidden_size, c.moe_ffn_hidden_size, c.num_layers) == (64, 96, 24, 5)
    assert (c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (4, None, 20)
    assert (c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim) == (12, 6, 10)
    assert (c.num_moe_experts, c.moe_shared_expert_intermediate_size, c.moe_router_topk) == (12, 48, 3)
    assert (c.moe_router_num_groups, c.moe_router_group_topk) == (3, 2)
    assert c.moe_router_topk_scaling_factor == 1.5 and c.layernorm_epsilon == 1e-5
    assert c.moe_layer_freq == [0, 0, 1, 1, 1]
    assert (c.vocab_size, c.max_position_embeddings, c.mtp_num_layers) == (300, 512, 2)
    assert (c.rope_type, c.rotary_base, c.rotary_scaling_factor) == ("yarn", 5000.0, 8.0)
    assert (c.original_max_position_embeddings, c.beta_fast, c.beta_slow) == (64, 16.0, 2.0)
    assert (c.mscale, c.mscale_all_dim) == (0.707, 0.5)
    assert c.init_method_std == 0.01 and c.params_dtype == torch.float32 and not c.bf16


def test_rope_spellings_agree_and_default_rope_is_plain_rope():
    legacy = config_from_hf(DEEPSEEK_V3)
    rope = dict(DEEPSEEK_V3["rope_scaling"], rope_type="yarn", rope_theta=10000.0)
    del rope["type"]
    modern = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("rope_scaling", "rope_theta")}
    modern = config_from_hf(dict(modern, rope_parameters=rope))
    for field in ARCHITECTURE:
        assert getattr(legacy, field) == getattr(modern, field), field
    plain = config_from_hf(dict(DEEPSEEK_V3, rope_scaling=None, rope_theta=500.0))
    assert (plain.rope_type, plain.rotary_base) == ("rope", 500.0)
    # a missing mscale keeps HF's attention factor mscale(factor) (our mscale=0 selects it)
    no_mscale = dict(DEEPSEEK_V3, rope_scaling={k: v for k, v in DEEPSEEK_V3["rope_scaling"].items()
                                                if k != "mscale"})
    assert config_from_hf(no_mscale).mscale == 0.0


def test_zero_mtp_layers_and_no_shared_expert_map_to_none():
    c = config_from_hf(dict(DEEPSEEK_V3, num_nextn_predict_layers=0, n_shared_experts=0))
    assert c.mtp_num_layers is None and c.moe_shared_expert_intermediate_size is None


REFUSED = [
    ("model_type", "llama"), ("hidden_act", "gelu"), ("attention_bias", True),
    ("tie_word_embeddings", True), ("norm_topk_prob", False), ("scoring_func", "softmax"),
    ("topk_method", "greedy"), ("moe_layer_freq", 2), ("n_routed_experts", None),
    ("num_key_value_heads", 1), ("n_group", 7), ("topk_group", 9), ("num_experts_per_tok", 300),
    ("qk_rope_head_dim", 63),
]


@pytest.mark.parametrize("field,value", REFUSED)
def test_config_the_model_cannot_hold_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        config_from_hf(dict(DEEPSEEK_V3, **{field: value}))


@pytest.mark.parametrize("field", ["n_group", "topk_group", "routed_scaling_factor"])
def test_routing_fields_whose_defaults_disagree_must_be_given(field):
    """transformers defaults them to 8, 4, 2.5 and DeepSeek's reference code to 1, 1, 1.0: a
    config without one would load as a different model depending on the reader."""
    config = {k: v for k, v in DEEPSEEK_V3.items() if k != field}
    with pytest.raises(ValueError, match=f"lacks {field}: transformers would take"):
        config_from_hf(config)


@pytest.mark.parametrize("rope_update,field", [
    ({"type": "linear"}, "rope_type"), ({"factor": None}, "factor"), ({"truncate": False}, "truncate"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"attention_factor": 2.0}, "attention_factor")])
def test_rope_settings_the_model_cannot_hold_are_refused(rope_update, field):
    rope = dict(DEEPSEEK_V3["rope_scaling"], **rope_update)
    with pytest.raises(ValueError, match=field):
        config_from_hf(dict(DEEPSEEK_V3, rope_scaling=rope))


def test_other_quantisation_schemes_are_refused():
    quant = dict(DEEPSEEK_V3["quantization_config"], weight_block_size=[64, 64])
    with pytest.raises(ValueError, match="weight_block_size"):
        config_from_hf(dict(DEEPSEEK_V3, quantization_config=quant))


def test_config_to_hf_round_trips_and_keeps_non_architecture_fields():
    ours = config_from_hf(DEEPSEEK_V3)
    written = config_to_hf(ours, base=DEEPSEEK_V3, fp8=True)
    assert written["quantization_config"] == DEEPSEEK_V3["quantization_config"]
    assert written["eos_token_id"] == 1 and written["rope_interleave"] is True
    assert written["rope_parameters"]["factor"] == 40 and written["rope_scaling"]["type"] == "yarn"
    again = config_from_hf(written)
    for field in ARCHITECTURE:
        assert getattr(again, field) == getattr(ours, field), field
    # both RoPE spellings in the written file describe the same RoPE
    legacy_only = {k: v for k, v in written.items() if k != "rope_parameters"}
    assert config_from_hf(legacy_only).rotary_scaling_factor == ours.rotary_scaling_factor
    no_yarn = config_to_hf(config_from_hf(dict(DEEPSEEK_V3, rope_scaling=None)))
    assert no_yarn["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert "quantization_config" not in config_to_hf(ours, base=DEEPSEEK_V3, fp8=False)
    # DeepSeek's release names its remote code (modeling_deepseek.py), which is not written next
    # to ours: with trust_remote_code a reader would look for it and fail
    remote = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
              "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    assert "auto_map" not in config_to_hf(ours, base=dict(DEEPSEEK_V3, auto_map=remote))


def test_config_to_hf_refuses_layer_patterns_hf_cannot_express():
    c = copy.copy(config_from_hf(dict(DEEPSEEK_V3, num_hidden_layers=4, first_k_dense_replace=1)))
    c.moe_layer_freq = [1, 0, 1, 1]
    with pytest.raises(ValueError, match="moe_layer_freq"):
        config_to_hf(c)
    assert math.isclose(config_from_hf(DEEPSEEK_V3).moe_router_topk_scaling_factor, 2.5)


def test_first_k_dense_replace_above_the_layer_count_makes_every_layer_dense():
    """transformers builds such a config (layer-truncated debug checkpoints) with every layer
    dense; it was refused as an out-of-range first_k_dense_replace."""
    c = config_from_hf(dict(DEEPSEEK_V3, num_hidden_layers=2, first_k_dense_replace=5))
    assert c.moe_layer_freq == [0, 0] and c.num_layers == 2
    assert config_to_hf(c)["first_k_dense_replace"] == 2


def test_config_to_hf_warns_when_latent_norms_use_another_epsilon():
    """HF's config.json has no field for MLA's latent-norm epsilon (transformers uses 1e-6)."""
    deepseek = config_from_hf(DEEPSEEK_V3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_to_hf(deepseek)  # 1e-6: nothing to say
    megatron_style = copy.copy(config_from_hf(DEEPSEEK_V3))
    megatron_style.layernorm_epsilon, megatron_style.dsv3_latent_norm_epsilon = 1e-5, None
    with pytest.warns(UserWarning, match="latent norms use epsilon 1e-05"):
        written = config_to_hf(megatron_style)
    assert written["rms_norm_eps"] == 1e-5
