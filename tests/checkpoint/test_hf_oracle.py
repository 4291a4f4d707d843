"""Oracle: an HF transformers DeepseekV3ForCausalLM checkpoint loaded with load_hf gives the logits
transformers gives (float32, 1e-5 relative), for several architectures; the MTP modules match a
hand-written MTP forward; an FP8 copy matches transformers on its dequantised weights."""

import json
import os

import pytest
import torch

from megatron_dsv3.checkpoint.hf_model import config_from_hf, load_hf
from megatron_dsv3.model import build_model

from hf_checkpoints import (
    YARN,
    add_mtp_layers,
    make_dequantised_copy,
    make_fp8_copy,
    make_hf_checkpoint,
    mtp_reference_logits,
    tensors,
)

CASES = {
    "q_lora-2_groups-yarn-1_dense-interleaved": {},
    "no_q_lora-1_group-rope-0_dense-rotate_half": dict(
        q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0, rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, n_shared_experts=2,
        num_experts_per_tok=3),
    "4_groups-yarn_mscale-2_dense-rotate_half": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3,
        first_k_dense_replace=2, n_routed_experts=16, n_group=4, topk_group=2,
        num_experts_per_tok=4, rope_interleave=False,
        rope_parameters=dict(YARN, factor=8.0, mscale=0.707, mscale_all_dim=0.5)),
}
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
POS = torch.arange(12).expand(2, 12)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def load_ours(path, **overrides):
    model = build_model(config_from_hf(path, dtype=torch.float32, **overrides)).eval()
    load_hf(model, path)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(case, tmp_path, single_rank_world):
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path, **CASES[case])
    model = load_ours(path)
    with torch.no_grad():
        ours, ref = model(IDS, POS, None), hf(input_ids=IDS).logits
    assert relative_error(ours, ref) < 1e-5
    # the weights are what makes them equal: a fresh model is far off
    fresh = build_model(config_from_hf(path, dtype=torch.float32)).eval()
    with torch.no_grad():
        assert relative_error(fresh(IDS, POS, None), ref) > 0.1


def test_rotate_half_checkpoints_need_the_rope_row_permutation(tmp_path, single_rank_world):
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path, rope_interleave=False)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config, rope_interleave=True), f)  # claim the wrong layout
    with torch.no_grad():
        wrong = load_ours(path)(IDS, POS, None)
        assert relative_error(wrong, hf(input_ids=IDS).logits) > 1e-3


@pytest.mark.parametrize("hf_overrides", [{}, {"first_k_dense_replace": 2}])
def test_mtp_layers_match_a_hand_written_mtp_forward(tmp_path, single_rank_world, hf_overrides):
    """Also with every main layer dense: the MTP layers are MoE wherever the model has routed
    experts (their index is past first_k_dense_replace, as vLLM and SGLang build them)."""
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path, **hf_overrides)
    add_mtp_layers(path, hf, depth=2)
    model = load_ours(path)
    assert model.config.mtp_num_layers == 2
    captured = []  # (cloned: the loss works on the logits in place)
    model.output_layer.register_forward_hook(lambda m, i, o: captured.append(o[0].transpose(0, 1).clone()))
    with torch.no_grad():
        model(IDS, POS, None, labels=IDS)  # labels run the MTP depths (eval mode: no tracking)
        references = mtp_reference_logits(hf, path, IDS, depth=2)
        main = hf(input_ids=IDS).logits
    *mtp_logits, main_logits = captured
    assert len(mtp_logits) == 2
    assert relative_error(main_logits, main) < 1e-5
    for ours, ref in zip(mtp_logits, references):
        assert relative_error(ours, ref) < 1e-5
    assert relative_error(mtp_logits[0], mtp_logits[1]) > 0.1  # the depths are different modules


def test_fp8_checkpoint_equals_transformers_on_its_dequantised_weights(tmp_path, single_rank_world):
    src, fp8, deq = (str(tmp_path / n) for n in ("hf", "fp8", "deq"))
    # dimensions over 128 so that weights have several and partial 128x128 blocks
    make_hf_checkpoint(src, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                       num_key_value_heads=4, qk_nope_head_dim=32, qk_rope_head_dim=16,
                       v_head_dim=16, q_lora_rank=40, kv_lora_rank=136)
    dequantised = make_fp8_copy(src, fp8)
    original = tensors(src)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(dequantised[name], original[name])  # FP8 really is lossy here
    make_dequantised_copy(src, deq, dequantised)
    from transformers import DeepseekV3ForCausalLM

    ref_model = DeepseekV3ForCausalLM.from_pretrained(deq, attn_implementation="eager").eval()
    model = load_ours(fp8)
    with torch.no_grad():
        assert relative_error(model(IDS, POS, None), ref_model(input_ids=IDS).logits) < 1e-5
