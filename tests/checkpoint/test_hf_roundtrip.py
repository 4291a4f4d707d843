"""save_hf: export then re-import is the identity (bitwise without FP8; the dequantised weights
with FP8); the export is DeepSeek's layout, read by transformers; bad checkpoints are refused
naming the tensor and the file; a failed save never replaces the last good checkpoint."""

import json
import math
import os
import shutil

import pytest
import torch

import megatron_dsv3.fp8.quant as quant
from megatron_dsv3.checkpoint.hf_model import config_from_hf, load_hf, save_hf
from megatron_dsv3.checkpoint.hf_config import read_hf_config
from megatron_dsv3.model import build_model

from hf_checkpoints import (
    add_mtp_layers,
    is_quantised,
    make_hf_checkpoint,
    naive_dequantize,
    rewrite,
    tensors,
)

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))


def loaded(path, dtype=torch.float32, **kw):
    model = build_model(config_from_hf(path, dtype=dtype)).eval()
    load_hf(model, path, **kw)
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def mtp_checkpoint(tmp_path):
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path, rope_interleave=False)
    add_mtp_layers(path, hf, depth=1)
    return path, hf


def test_fp32_export_is_the_original_checkpoint_bitwise(mtp_checkpoint, tmp_path, single_rank_world):
    path, _ = mtp_checkpoint
    model = loaded(path)
    out = str(tmp_path / "out")
    save_hf(model, out, fp8=False, base_config=read_hf_config(path), max_shard_bytes=20_000)
    original, exported = tensors(path), tensors(out)
    assert original.keys() == exported.keys()  # MTP copies of embedding and head included
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # several shards
    assert read_hf_config(out)["rope_interleave"] is False  # the base config's layout is kept
    assert_same_state(loaded(out), model)


def test_export_in_native_layout_reimports_identically_and_transformers_reads_it(
        mtp_checkpoint, tmp_path, single_rank_world):
    from transformers import DeepseekV3ForCausalLM

    path, hf = mtp_checkpoint
    model = loaded(path)
    out = str(tmp_path / "out")
    save_hf(model, out, fp8=False)  # rope_interleave=True, DeepSeek's native layout
    assert read_hf_config(out)["rope_interleave"] is True
    assert_same_state(loaded(out), model)
    reread = DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(reread(input_ids=IDS).logits, hf(input_ids=IDS).logits,
                              rtol=1e-5, atol=1e-6)


def test_bf16_export_reimports_bitwise(mtp_checkpoint, tmp_path, single_rank_world):
    path, _ = mtp_checkpoint
    model = loaded(path, dtype=torch.bfloat16)
    out = str(tmp_path / "out")
    save_hf(model, out, fp8=False)
    stored = tensors(out)
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router stays fp32
    assert_same_state(loaded(out, dtype=torch.bfloat16), model)


def test_fp8_export_is_deepseeks_layout_and_reimports_as_the_dequantised_weights(
        mtp_checkpoint, tmp_path, single_rank_world):
    path, _ = mtp_checkpoint
    model = loaded(path)
    out = str(tmp_path / "out")
    save_hf(model, out, fp8=True, base_config=read_hf_config(path))
    assert read_hf_config(out)["quantization_config"]["weight_block_size"] == [128, 128]
    original, exported = tensors(path), tensors(out)
    for name, t in original.items():
        if is_quantised(name):
            q, scale = exported[name], exported[name + "_scale_inv"]
            assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert tuple(scale.shape) == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            assert (naive_dequantize(q, scale) - t).abs().max() <= t.abs().max() / 8  # E4M3: 3 bits
        else:  # norms, embedding, head, router, router bias, eh_proj, MTP copies
            assert torch.equal(exported[name], t), name
    reimported = {k: v for k, v in loaded(out).state_dict().items() if isinstance(v, torch.Tensor)}
    expected = tensors(out)
    for name in [n for n in original if is_quantised(n)]:
        expected[name] = naive_dequantize(expected.pop(name), expected.pop(name + "_scale_inv"))
    rewrite(out, expected, {"quantization_config": None})
    assert_same_state_dict(reimported, loaded(out).state_dict())


def assert_same_state_dict(a, b):
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_architecture_mismatch_is_refused_naming_the_field(tmp_path, single_rank_world):
    path = str(tmp_path / "hf")
    make_hf_checkpoint(path)
    model = build_model(config_from_hf(path, dtype=torch.float32, moe_router_topk=3))
    with pytest.raises(ValueError, match="moe_router_topk=2"):
        load_hf(model, path)


def test_unused_tensors_are_an_error_unless_allowed(mtp_checkpoint, single_rank_world):
    path, hf = mtp_checkpoint
    model = build_model(config_from_hf(path, dtype=torch.float32, mtp_num_layers=None)).eval()
    with pytest.raises(ValueError, match=r"not used by the model, e.g. \['model.layers.2"):
        load_hf(model, path)
    load_hf(model, path, allow_unused=True)
    with torch.no_grad():
        assert torch.allclose(model(IDS, torch.arange(12).expand(2, 12), None),
                              hf(input_ids=IDS).logits, rtol=1e-5, atol=1e-6)


def test_mtp_copies_that_differ_from_the_shared_weights_are_refused(mtp_checkpoint, single_rank_world):
    path, _ = mtp_checkpoint
    state = tensors(path)
    state["model.layers.2.embed_tokens.weight"] = state["model.layers.2.embed_tokens.weight"] + 1
    rewrite(path, state)
    with pytest.raises(ValueError, match="model.layers.2.embed_tokens.weight differs from "
                                         "model.embed_tokens.weight"):
        loaded(path)


def test_missing_wrong_shaped_and_fp8_scale_errors_name_tensor_and_file(tmp_path, single_rank_world):
    path = str(tmp_path / "hf")
    make_hf_checkpoint(path)
    model = loaded(path)
    sharded = str(tmp_path / "sharded")
    save_hf(model, sharded, fp8=True, max_shard_bytes=20_000)
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    victim = index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    broken = str(tmp_path / "missing_shard")
    shutil.copytree(sharded, broken)
    os.remove(os.path.join(broken, victim))
    with pytest.raises(ValueError, match=rf"{victim} is missing"):
        load_hf(model, broken)

    state = tensors(path)
    wrong = dict(state, **{"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(3, 3)})
    rewrite(path, wrong)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.kv_b_proj.weight in "
                                         r".*model.safetensors has shape \[3, 3\]"):
        load_hf(model, path)
    rewrite(path, {k: v for k, v in state.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match=r"model.norm.weight is missing .*index.json"):
        load_hf(model, path)

    fp8 = tensors(sharded)
    fp8["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"] = torch.ones(2, 1)
    rewrite(sharded, fp8)
    with pytest.raises(ValueError, match=r"experts.3.up_proj.weight_scale_inv in .*model.safetensors"
                                         r" has shape \[2, 1\]"):
        load_hf(model, sharded)


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, single_rank_world, monkeypatch):
    path = str(tmp_path / "hf")
    make_hf_checkpoint(path)
    model = loaded(path)
    out = str(tmp_path / "out")
    save_hf(model, out, fp8=True)
    good = tensors(out)
    calls = []

    def failing(w, **kw):
        calls.append(1)
        if len(calls) == 10:
            raise OSError("disk full")
        return real(w, **kw)

    real = quant.quantize_128x128
    monkeypatch.setattr(quant, "quantize_128x128", failing)
    with torch.no_grad():
        model.decoder.final_layernorm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, out, fp8=True)
    after = tensors(out)
    assert after.keys() == good.keys()
    assert all(torch.equal(after[k].view(torch.uint8), good[k].view(torch.uint8)) for k in good)
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # nothing half-written left behind
    with pytest.raises(ValueError, match="exists"):
        save_hf(model, out, fp8=True, overwrite=False)
