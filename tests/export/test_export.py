"""Post-training quantisation and export with nvidia-modelopt (megatron_dsv3.export), on CPU.

A briefly trained deepseek-v3-tiny (its HF checkpoint) is exported in the formats modelopt runs on
CPU, read back through our load_hf / generate, and checked against independent references:
- every exported quantised weight, dequantised by our reader, equals modelopt's own fake-quantised
  weight of that module (its quantiser applied to the module's weight), piece by piece;
- the fp8-block export is DeepSeek's layout, tensor for tensor equal to save_hf(fp8=True) where
  both quantise, with the MTP layer kept in BF16 (modelopt leaves `mtp.*` unquantised by default);
- the router, embedding, head, norms and MTP keep their dtypes;
- the held-out loss of each reloaded model is within a measured bound of the original's;
- bad inputs are refused with the field and the allowed values.
"""

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from megatron_dsv3.checkpoint.hf_config import read_hf_config  # noqa: E402
from megatron_dsv3.checkpoint.quantized import open_hf_reader, unpack_int4  # noqa: E402
from megatron_dsv3.checkpoint.safetensors_io import HFReader  # noqa: E402
from megatron_dsv3.corpus import heldout_batches, heldout_loss  # noqa: E402

SEQ, CALIB = 64, 16


def reader_of(path):
    """The reader load_hf uses for the checkpoint at `path`."""
    return open_hf_reader(path, read_hf_config(path))

# |loss(reloaded export) - loss(BF16)| / loss(BF16) on the held-out batches. Measured on this
# fixture: fp8-block 0.011%, fp8 0.006%, int8-wo 0.001%, int4-awq (group 32) 0.095%; scaling every
# layer's linears by 1.3 (a wrong scale) moves it by 0.81%.
LOSS_BOUND = {"fp8-block": 0.0005, "fp8": 0.0005, "int8-wo": 0.0002, "int4-awq": 0.003}


@pytest.fixture(scope="module")
def trained_hf(single_rank_world, tmp_path_factory):
    """(HF checkpoint dir of a briefly trained tiny model, held-out batches, its BF16 loss)."""
    from megatron_dsv3.checkpoint.hf import save_hf
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.inference.loading import load_hf_checkpoint
    from megatron_dsv3.model import build_model

    torch.manual_seed(0)
    # dense FFN 128 wide instead of tiny's 160: transformers 5.24's FineGrainedFP8 dequantises a
    # partial edge block differently from DeepSeek's layout (seen with 160), and DeepSeek-V3's
    # widths are whole 128-blocks
    model = build_model(get_config("deepseek-v3-tiny", ffn_hidden_size=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in heldout_batches(40 * 8, SEQ, 8, train_bytes=0):
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.pop_mtp_losses()
    path = str(tmp_path_factory.mktemp("export") / "hf")
    save_hf(model, path, fp8=False)
    held = heldout_batches(32, SEQ, 8)
    return path, held, heldout_loss(load_hf_checkpoint(path, torch.bfloat16), held)


def _export(trained_hf, tmp_path_factory, quant, **kw):
    from megatron_dsv3.export.api import export

    out = str(tmp_path_factory.mktemp(quant) / "out")
    report = export(trained_hf[0], out, quant, calib=CALIB, calib_seq_length=SEQ,
                    progress=False, **kw)
    return out, report


@pytest.fixture(scope="module")
def exports(trained_hf, tmp_path_factory):
    return {q: _export(trained_hf, tmp_path_factory, q, **kw) for q, kw in
            (("fp8-block", {}), ("fp8", {}), ("int8-wo", {}), ("int4-awq", {"group_size": 32}))}


@pytest.mark.parametrize("quant", sorted(LOSS_BOUND))
def test_export_reloads_through_load_hf_with_heldout_loss_within_bound(trained_hf, exports, quant):
    from megatron_dsv3.inference.loading import load_hf_checkpoint

    _, held, reference = trained_hf
    model = load_hf_checkpoint(exports[quant][0], torch.bfloat16)
    change = abs(heldout_loss(model, held) - reference) / reference
    assert change < LOSS_BOUND[quant]
    # and the export really quantised: the reloaded weights are not the original ones
    original = HFReader(trained_hf[0]).read("model.layers.0.self_attn.q_b_proj.weight").float()
    reloaded = reader_of(exports[quant][0]).read("model.layers.0.self_attn.q_b_proj.weight")
    assert not torch.equal(original, reloaded.float())


def test_generate_runs_on_two_exports(exports, capsys):
    from megatron_dsv3.generate import main

    for quant in ("fp8-block", "int4-awq"):
        assert main(["--checkpoint", exports[quant][0], "--prompt-ids", "100,101,102",
                     "--max-new-tokens", "4"]) == 0
        out = capsys.readouterr().out
        ids = [int(t) for t in out.strip().splitlines()[-1].split(",")]
        assert ids[:3] == [100, 101, 102] and len(ids) == 7


def assert_same_codes(got, fake, quant):
    """The export's weights are modelopt's fake-quantised ones: at least 95% equal exactly, the
    rest one code apart (modelopt's fake-quant kernel multiplies by bound/amax where its exporter
    and DeepSeek's quantiser divide by amax/bound: a value on a rounding boundary may land on the
    neighbouring code)."""
    equal = torch.isclose(got, fake, rtol=1e-5, atol=1e-7)
    assert equal.float().mean() >= 0.95, f"only {equal.float().mean():.1%} of the codes agree"
    diff = (got - fake).abs()
    if quant == "fp8-block":  # one E4M3 step: 2^-3 of the value (2^-9 of amax below normals)
        assert bool((diff <= 0.125 * fake.abs() + fake.abs().max() * 2**-9).all())
    else:
        bound = {"int4-awq": 7, "int8-wo": 127}[quant]
        assert bool((diff <= fake.abs().max() / bound * 1.001).all())


def _fake_quant_reference(trained_hf, quant, group_size=None):
    """A fresh copy of the model quantised by modelopt with the same calibration: name -> (the
    fake-quantised weight modelopt's forward uses, AWQ's pre_quant_scale per column or None)."""
    from megatron_dsv3.export.formats import get_format
    from megatron_dsv3.export.quantize import calibration_batches, quantize
    from megatron_dsv3.inference.loading import load_hf_checkpoint

    model = load_hf_checkpoint(trained_hf[0], torch.bfloat16)
    batches = calibration_batches(model.config, None, CALIB, SEQ, 4)
    quantize(model, get_format(quant), batches, group_size=group_size, progress=False)
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_quantizer") and module.weight_quantizer.is_enabled:
                w = module.weight_quantizer(module.weight.float())  # in float32: no bf16 rounding
                pqs = getattr(module.input_quantizer, "_pre_quant_scale", None)
                out[name] = (w, None if pqs is None else pqs.float())
            elif hasattr(module, "fc1_weight_quantizers") and module.fc1_weight_quantizers[0].is_enabled:
                for proj in ("fc1", "fc2"):
                    out[f"{name}.{proj}"] = torch.stack([
                        q(w.float()) for q, w in zip(getattr(module, f"{proj}_weight_quantizers"),
                                                     getattr(module, f"{proj}_weight"))])
    return model, out


@pytest.mark.parametrize("quant,group_size", [("int4-awq", 32), ("int8-wo", None),
                                              ("fp8-block", None)])
def test_exported_weights_are_modelopts_fake_quantised_weights(trained_hf, exports, quant,
                                                               group_size):
    model, fake = _fake_quant_reference(trained_hf, quant, group_size)
    reader = reader_of(exports[quant][0])
    L = model.config.num_layers
    checked = 0
    for i in range(L):
        attn = f"decoder.layers.{i}.self_attention"
        for ours, hf in (("linear_q_up_proj", "q_b_proj"), ("linear_kv_up_proj", "kv_b_proj"),
                         ("linear_proj", "o_proj"), ("linear_q_down_proj", "q_a_proj")):
            got = reader.read(f"model.layers.{i}.self_attn.{hf}.weight").float()
            weight, pqs = fake[f"{attn}.{ours}"]
            # the reader folds AWQ's pre_quant_scale into the columns: compare before it
            assert_same_codes(got if pqs is None else got / pqs, weight, quant)
            checked += 1
        experts = f"decoder.layers.{i}.mlp.experts"
        # (tiny's experts are 32 wide: the gate/up split cuts fc1's 128x128 block, which the
        # fp8-block export re-blocks per HF tensor, DeepSeek's rule; DeepSeek-V3's 2048 does not)
        if experts + ".fc1" in fake and quant != "fp8-block":
            F = model.config.moe_ffn_hidden_size
            for e in (0, 7, 15):
                hf = f"model.layers.{i}.mlp.experts.{e}"
                assert_same_codes(reader.read(hf + ".gate_proj.weight").float(),
                                  fake[experts + ".fc1"][e, :F], quant)
                assert_same_codes(reader.read(hf + ".up_proj.weight").float(),
                                  fake[experts + ".fc1"][e, F:], quant)
                assert_same_codes(reader.read(hf + ".down_proj.weight").float(),
                                  fake[experts + ".fc2"][e], quant)
                checked += 3
    assert checked >= 4 * L + (0 if quant == "fp8-block" else 9 * (L - 1))


def test_fp8_block_export_is_save_hf_fp8_layout_except_the_mtp_layer(trained_hf, exports,
                                                                      tmp_path):
    from megatron_dsv3.checkpoint.hf import save_hf
    from megatron_dsv3.inference.loading import load_hf_checkpoint

    model = load_hf_checkpoint(trained_hf[0], torch.bfloat16)
    save_hf(model, str(tmp_path / "ds"), fp8=True)
    ours, theirs = HFReader(exports["fp8-block"][0]), HFReader(str(tmp_path / "ds"))
    L = model.config.num_layers
    assert set(ours.names()) <= set(theirs.names())
    same = 0
    for name in theirs.names():
        mtp = name.startswith(f"model.layers.{L}.")
        if mtp and name.endswith("_scale_inv"):
            assert not ours.has(name)  # MTP stays BF16 in the export (modelopt's `mtp.*` rule)
            continue
        if mtp and theirs.dtype(name) == torch.float8_e4m3fn:
            assert ours.dtype(name) == torch.bfloat16
            continue
        assert ours.dtype(name) == theirs.dtype(name), name
        assert torch.equal(ours._slice(name, None).view(torch.uint8) if ours.dtype(name) ==
                           torch.float8_e4m3fn else ours._slice(name, None),
                           theirs._slice(name, None).view(torch.uint8) if theirs.dtype(name) ==
                           torch.float8_e4m3fn else theirs._slice(name, None)), name
        same += 1
    assert same > 100
    config = json.load(open(os.path.join(exports["fp8-block"][0], "config.json")))
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    kept = config["quantization_config"]["modules_to_not_convert"]
    assert {"lm_head", "model.layers.1.mlp.gate", f"model.layers.{L}.self_attn.q_b_proj",
            f"model.layers.{L}.mlp.experts.5.down_proj", f"model.layers.{L}.shared_head.head",
            f"model.layers.{L}.eh_proj"} <= set(kept)
    assert not any("*" in k for k in kept)  # transformers matches names, not patterns


def test_high_precision_modules_keep_their_dtype(trained_hf, exports):
    for quant, (out, _) in exports.items():
        reader = HFReader(out)
        L = 3
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                     "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                     "model.layers.0.input_layernorm.weight", f"model.layers.{L}.eh_proj.weight",
                     f"model.layers.{L}.self_attn.q_b_proj.weight",
                     f"model.layers.{L}.mlp.experts.0.gate_proj.weight"):
            assert reader.dtype(name) in (torch.bfloat16, torch.float32), (quant, name)
        stored = reader.dtype("model.layers.1.mlp.experts.0.gate_proj.weight")
        assert stored == {"fp8-block": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn,
                          "int8-wo": torch.int8, "int4-awq": torch.uint8}[quant]
        if quant != "fp8-block":
            hf_quant = json.load(open(os.path.join(out, "hf_quant_config.json")))["quantization"]
            assert "model.layers.1.mlp.gate" in hf_quant["exclude_modules"]
            assert "lm_head" in hf_quant["exclude_modules"]


def test_awq_linears_reading_one_input_share_its_pre_quant_scale(trained_hf, exports):
    """Serving engines fuse q_a_proj and kv_a_proj_with_mqa (same input) into one GEMM, which holds
    one pre_quant_scale: the export gives them the average of the two AWQ found, each weight
    rescaled by old / new (modelopt's own exporter does the same). The loss bound above holds
    for the result; here the scales are one and are the mean of the unfused ones."""
    from megatron_dsv3.export import quantize as q
    from megatron_dsv3.export.formats import get_format
    from megatron_dsv3.inference.loading import load_hf_checkpoint

    reader = HFReader(exports["int4-awq"][0])
    for i in range(4):  # (layer 3 is the MTP layer: unquantised, no scale)
        names = [f"model.layers.{i}.self_attn.{m}.pre_quant_scale"
                 for m in ("q_a_proj", "kv_a_proj_with_mqa")]
        if i == 3:
            assert not any(reader.has(n) for n in names)
            continue
        a, b = (reader._slice(n, None) for n in names)
        assert torch.equal(a, b), i
    # the fusion itself, against the unfused scales and weights of the same calibration
    model = load_hf_checkpoint(trained_hf[0], torch.bfloat16)
    batches = q.calibration_batches(model.config, None, 4, 32, 4)
    unfused = q.fuse_shared_inputs
    try:
        q.fuse_shared_inputs = lambda m: None
        q.quantize(model, get_format("int4-awq"), batches, group_size=32, progress=False)
    finally:
        q.fuse_shared_inputs = unfused
    pair = q.shared_input_linears(model)[0]
    before = [(m.input_quantizer.pre_quant_scale.clone(), m.weight.clone()) for m in pair]
    assert not torch.equal(before[0][0], before[1][0])
    q.fuse_shared_inputs(model)
    mean = (before[0][0] + before[1][0]) / 2  # (in the scales' dtype, BF16 here)
    for m, (scale, weight) in zip(pair, before):
        assert torch.equal(m.input_quantizer.pre_quant_scale, mean)
        # x * s_old @ W.T == x * s_new @ (W * s_old / s_new).T: the layer computes the same
        assert torch.equal(m.weight, (weight.float() * scale.float() / mean.float()
                                      ).to(weight.dtype))


def test_int4_layout_round_trips_through_modelopts_packer():
    """Our reader's unpacking inverts modelopt's int4 packing (independent of the export)."""
    from modelopt.torch.export.quant_utils import to_quantized_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-8, 8, (6, 64), generator=g).float()
    packed = to_quantized_weight(w, torch.ones(6, 2), "int4_awq", None, 32)
    assert packed.shape == (3, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed).float(), w)


def test_rotate_half_sources_are_exported_as_rotate_half(trained_hf, tmp_path_factory):
    """The tensors keep the source's RoPE layout, so config.json must say it: a source with
    rope_interleave=false was exported labelled true (every reader then paired RoPE wrongly)."""
    import shutil

    source = str(tmp_path_factory.mktemp("rotate_half") / "hf")
    shutil.copytree(trained_hf[0], source)
    config = json.load(open(os.path.join(source, "config.json")))
    config["rope_interleave"] = False
    json.dump(config, open(os.path.join(source, "config.json"), "w"))
    out, _ = _export((source,) + tuple(trained_hf[1:]), tmp_path_factory, "int8-wo")
    assert json.load(open(os.path.join(out, "config.json")))["rope_interleave"] is False
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # its last rows are RoPE's
    source_rows = HFReader(source)._slice(name, None).float()
    exported = reader_of(out).read(name).float()
    assert (exported - source_rows).abs().max() < 0.02 * source_rows.abs().max()


def _unquantised_modules(out):
    """The module names (or patterns) an export's config says are left unquantised."""
    q = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    return q.get("modules_to_not_convert") or q.get("exclude_modules") or q["ignore"]


def _listed(name, patterns):
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_unquantised_list(out, L):
    """Every linear of the export is either stored quantised (it has a scale) or listed as
    unquantised, never both: a reader decides by the list."""
    reader, listed = HFReader(out), _unquantised_modules(out)
    checked = 0
    for name in reader.names():
        if not name.endswith(".weight") or reader.dtype(name) == torch.float32 or "norm" in name \
                or "embed_tokens" in name:
            continue
        module = name[: -len(".weight")]
        quantised = any(reader.has(module + s) for s in (".weight_scale", ".weight_scale_inv"))
        assert quantised != _listed(module, listed), (module, quantised)
        checked += 1
    assert checked > 50
    return reader


@pytest.mark.parametrize("quant", ["int8-wo", "fp8-block"])
def test_export_report_and_also_quantize_mtp_and_head(trained_hf, tmp_path_factory, quant):
    from megatron_dsv3.inference.loading import load_hf_checkpoint

    L = 3
    if quant == "fp8-block":
        # the MTP layer's FP8 copy of the head has scales: it reads back
        out, _ = _export(trained_hf, tmp_path_factory, quant, also_quantize=("mtp", "head"))
        assert load_hf_checkpoint(out, torch.bfloat16).config.mtp_num_layers == 1
        _check_unquantised_list(out, L)
        # the MTP layer alone: quantised as DeepSeek's release and save_hf(fp8=True) write it
        # (eh_proj and the copy of the head in BF16, listed as such)
        out, _ = _export(trained_hf, tmp_path_factory, quant, also_quantize=("mtp",))
        reader = _check_unquantised_list(out, L)
        assert reader.dtype(f"model.layers.{L}.eh_proj.weight") == torch.bfloat16
        assert reader.dtype(f"model.layers.{L}.shared_head.head.weight") == torch.bfloat16
        assert reader.dtype(f"model.layers.{L}.self_attn.q_b_proj.weight") == torch.float8_e4m3fn
        assert {f"model.layers.{L}.eh_proj", f"model.layers.{L}.shared_head.head"} <= set(
            _unquantised_modules(out))
        return
    out, report = _export(trained_hf, tmp_path_factory, "int8-wo", also_quantize=("mtp", "head"))
    # the head quantised: the MTP layer is not listed whole (its copy of the head is quantised)
    _check_unquantised_list(out, L)
    assert report["format"] == "int8-wo" and report["checkpoint_kind"] == "hf"
    assert report["safetensors_bytes"] > 0 and report["peak_rss_mib"] > 0
    reader = HFReader(out)
    for name in ("model.layers.3.self_attn.q_b_proj.weight", "model.layers.3.eh_proj.weight",
                 "lm_head.weight", "model.layers.3.shared_head.head.weight"):
        assert reader.dtype(name) == torch.int8, name
    # the MTP layer's head is DeepSeek's copy of the output head, scales included
    for suffix in ("weight", "weight_scale"):
        assert torch.equal(reader._slice(f"lm_head.{suffix}", None),
                           reader._slice(f"model.layers.3.shared_head.head.{suffix}", None))
    assert reader.dtype("model.embed_tokens.weight") == torch.bfloat16  # never quantised
    model = load_hf_checkpoint(out, torch.bfloat16)  # reads back, MTP included
    assert model.config.mtp_num_layers == 1


def test_each_weight_is_quantised_once(trained_hf, tmp_path_factory, monkeypatch):
    """The writer's plan comes from shape rules: modelopt's packer runs once per written
    quantised tensor (not once for the plan and again for the data)."""
    import modelopt.torch.export.quant_utils as quant_utils

    calls = []
    packer = quant_utils.to_quantized_weight
    monkeypatch.setattr(quant_utils, "to_quantized_weight",
                        lambda *a, **k: calls.append(1) or packer(*a, **k))
    out, _ = _export(trained_hf, tmp_path_factory, "int8-wo")
    reader = HFReader(out)
    written = [n for n in reader.names() if reader.dtype(n) == torch.int8]
    assert len(written) > 0 and len(calls) == len(written)


def test_ue8m0_source_is_exported_with_power_of_2_block_scales(trained_hf, tmp_path):
    """A source whose quantization_config says scale_fmt ue8m0 (DeepSeek-V3.1's release) keeps it,
    so every exported block scale must be a power of 2 (a reader of ue8m0 keeps the exponent
    only), and the weights read back within one E4M3 step of the source."""
    from megatron_dsv3.checkpoint.hf import save_hf
    from megatron_dsv3.checkpoint.hf_config import FP8_QUANTIZATION_CONFIG
    from megatron_dsv3.export.api import export
    from megatron_dsv3.inference.loading import load_hf_checkpoint

    source = str(tmp_path / "ue8m0")
    save_hf(load_hf_checkpoint(trained_hf[0], torch.bfloat16), source, fp8=True, base_config={
        "quantization_config": dict(FP8_QUANTIZATION_CONFIG, scale_fmt="ue8m0")})
    out = str(tmp_path / "out")
    export(source, out, "fp8-block", calib=2, calib_seq_length=16, progress=False)
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"][
        "scale_fmt"] == "ue8m0"
    reader, scales = HFReader(out), 0
    for name in reader.names():
        if name.endswith("_scale_inv"):
            s = reader._slice(name, None).float()
            assert torch.equal(torch.exp2(torch.log2(s).round()), s), name
            scales += 1
    assert scales > 50
    name = "model.layers.0.self_attn.q_b_proj.weight"
    got, want = reader_of(out).read(name).float(), reader_of(source).read(name).float()
    assert ((got - want).abs() <= 0.125 * want.abs() + want.abs().max() * 2**-8).all()


def test_command_line_report_is_json_and_tokenizer_is_published_with_the_weights(
        trained_hf, tmp_path, capsys, monkeypatch):
    """stdout holds the JSON report alone (modelopt's own lines go to stderr); the source's
    tokenizer files are in the export, copied before it is published (a failure while copying
    them leaves no export behind); the source's auto_map (remote code we do not copy) is gone."""
    import shutil

    from megatron_dsv3.export import hf_writer
    from megatron_dsv3.export.__main__ import main

    source = str(tmp_path / "src")
    shutil.copytree(trained_hf[0], source)
    with open(os.path.join(source, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0"}')
    config = json.load(open(os.path.join(source, "config.json")))
    config["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    json.dump(config, open(os.path.join(source, "config.json"), "w"))
    out = str(tmp_path / "out")
    args = ["--checkpoint", source, "--quant", "int8-wo", "--out", out, "--calib", "2",
            "--calib-seq-length", "16"]
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["format"] == "int8-wo"
    assert "calibrate:" in captured.err  # (progress, not --quiet)
    assert open(os.path.join(out, "tokenizer.json")).read() == '{"version": "1.0"}'
    assert "auto_map" not in json.load(open(os.path.join(out, "config.json")))

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_writer.shutil, "copy2", fail)
    again = str(tmp_path / "again")
    assert main(args[:5] + [again] + args[6:] + ["--quiet"]) == 1
    assert "no space left on device while writing" in capsys.readouterr().err
    assert not os.path.exists(again)


def test_bad_inputs_are_refused_with_field_and_allowed_values(trained_hf, tmp_path, capsys):
    from megatron_dsv3.export.__main__ import main
    from megatron_dsv3.export.api import export
    from megatron_dsv3.export.quantize import FormatUnavailable

    with pytest.raises(SystemExit):
        main(["--checkpoint", trained_hf[0], "--quant", "int3", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", trained_hf[0], "--quant", "fp8", "--out", str(tmp_path / "x"),
              "--format", "trtllm"])
    assert "--format trtllm: TensorRT-LLM serves DeepSeek-V3 from the HF checkpoint" in \
        capsys.readouterr().err
    with pytest.raises(FormatUnavailable, match=r"--quant nvfp4 cannot run on cpu: modelopt says"
                       r".*Formats that run on cpu: \['fp8-block', 'fp8', 'int8-wo', 'int4-awq'\]"):
        export(trained_hf[0], str(tmp_path / "n"), "nvfp4", progress=False)
    with pytest.raises(ValueError, match=r"--group-size 128: .* has 64 input features.*allowed "
                       r"values for this model: \[32\]"):
        export(trained_hf[0], str(tmp_path / "g"), "int4-awq", calib=2, calib_seq_length=SEQ,
               progress=False)
    with pytest.raises(ValueError, match=r"--group-size 16 is not offered for --quant int4-awq: "
                       r"allowed values are \[128, 64, 32\]"):
        export(trained_hf[0], str(tmp_path / "g"), "int4-awq", group_size=16, progress=False)
    with pytest.raises(ValueError, match=r"--group-size applies to \['int4-awq', 'nvfp4'\]"):
        export(trained_hf[0], str(tmp_path / "g"), "fp8", group_size=32, progress=False)
    with pytest.raises(ValueError, match=r"--calib-seq-length 100000 is invalid for this model: "
                       r"allowed values are 1 to its max_position_embeddings=\d+"):
        export(trained_hf[0], str(tmp_path / "s"), "fp8", calib=1, calib_seq_length=100000,
               progress=False)
    for device, message in (("tpu", "--device 'tpu' is invalid: allowed are cpu, cuda, cuda:N"),
                            ("cuda", "--device cuda is invalid here: CUDA is not available")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        for extra in ([], ["--list-formats"]):
            with pytest.raises(SystemExit):
                main(["--checkpoint", trained_hf[0], "--quant", "fp8", "--out",
                      str(tmp_path / "d"), "--device", device] + extra)
            assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--hf-config applies to a distributed checkpoint .*is "
                       r"an HF checkpoint .*drop --hf-config"):
        export(trained_hf[0], str(tmp_path / "h"), "fp8", hf_config=str(tmp_path / "none.json"),
               progress=False)
    with pytest.raises(ValueError, match=r"--calib 100000 x --calib-seq-length 64 is more than the "
                       r"default calibration text holds .*--calib-data"):
        export(trained_hf[0], str(tmp_path / "c"), "fp8", calib=100000, calib_seq_length=SEQ,
               progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--out .*file/x: .*file is a file, not a directory"):
        export(trained_hf[0], str(tmp_path / "file" / "x"), "fp8", progress=False)
    os.symlink(str(tmp_path / "gone"), str(tmp_path / "dangling"))
    with pytest.raises(ValueError, match=r"--out .*dangling/x: .*dangling is a dangling symbolic "
                                         r"link, not a directory"):
        export(trained_hf[0], str(tmp_path / "dangling" / "x"), "fp8", progress=False)
    if os.path.isdir("/proc/self"):  # (root may write anywhere but there)
        with pytest.raises(ValueError, match=r"--out /proc/x: cannot write in /proc"):
            export(trained_hf[0], "/proc/x", "fp8", progress=False)
    (tmp_path / "junk").mkdir()
    assert main(["--checkpoint", str(tmp_path / "junk"), "--quant", "fp8", "--out",
                 str(tmp_path / "y")]) == 1
    assert "not a checkpoint we read" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_group_size_is_checked_against_each_routed_expert_projection(single_rank_world):
    """Routed experts pack fc1 (input: hidden) and fc2 (input: expert width) in groups each; a
    group dividing the hidden size but not the expert width was passed (the check took the
    smaller width) and the export failed inside modelopt's packer after calibration."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.export.formats import FORMATS
    from megatron_dsv3.export.quantize import check_group_size
    from megatron_dsv3.model import build_model

    config = get_config("deepseek-v3-tiny", moe_ffn_hidden_size=96, ffn_hidden_size=128,
                        moe_shared_expert_intermediate_size=192, q_lora_rank=64,
                        kv_lora_rank=64)
    assert config.hidden_size % 64 == 0 and 96 % 64 and 192 % 64 == 0
    model = build_model(config)
    with pytest.raises(ValueError, match=r"--group-size 64: decoder\.layers\.\d+\.mlp\.experts"
                                         r"\.fc2 has 96 input features.*allowed values for this "
                                         r"model: \[32\]"):
        check_group_size(model, FORMATS["int4-awq"], 64)
    assert check_group_size(model, FORMATS["int4-awq"], 32) == 32


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.index_fill(0, torch.tensor([3]), 0.0), "holds scales that are not finite and > 0"),
    (lambda s: s[:-1].clone(), r"has shape \[\d+\], which does not fit a \[\d+, \d+\] W8A16 "
                               "weight")])
def test_reader_refuses_a_damaged_modelopt_scale_naming_file_and_tensor(exports, tmp_path,
                                                                        damage, message):
    """A weight_scale that is not > 0, or of a shape that does not fit its weight, is refused on
    check and on a read without check (each weight's scales are checked once)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_dsv3.checkpoint.errors import CheckpointFileError

    path = str(tmp_path / "int8")
    shutil.copytree(exports["int8-wo"][0], path)
    name = "model.layers.0.self_attn.q_b_proj.weight"
    file = os.path.join(path, reader_of(path).weight_map[name[:-len("weight")] + "weight_scale"])
    tensors = load_file(file)
    tensors[name[:-len("weight")] + "weight_scale"] = damage(
        tensors[name[:-len("weight")] + "weight_scale"])
    save_file(tensors, file, metadata={"format": "pt"})
    os.remove(os.path.join(path, "checkpoint_manifest.json"))  # (changed on purpose)
    for use in (lambda r: r.check(name, r.shape(name)), lambda r: r.read(name)):
        with pytest.raises(CheckpointFileError, match=message) as e:
            use(reader_of(path))
        assert "q_b_proj.weight_scale" in str(e.value) and os.path.basename(file) in str(e.value)


def test_reader_refuses_quantised_codes_whose_scale_is_missing(exports, tmp_path):
    """A weight stored as int8 codes whose weight_scale was dropped (from its shard and the
    index) is refused naming the tensor, its file and the missing scale, on check and on a read
    without check. Before, the raw codes loaded as the weight (447.9 off at FP8, measured)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_dsv3.checkpoint.errors import CheckpointFileError

    path = str(tmp_path / "int8")
    shutil.copytree(exports["int8-wo"][0], path)
    name = "model.layers.0.self_attn.q_b_proj.weight"
    scale = name[:-len("weight")] + "weight_scale"
    file = os.path.join(path, reader_of(path).weight_map[scale])
    tensors = load_file(file)
    del tensors[scale]
    save_file(tensors, file, metadata={"format": "pt"})
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            data = json.load(f)
        del data["weight_map"][scale]
        with open(index, "w") as f:
            json.dump(data, f)
    os.remove(os.path.join(path, "checkpoint_manifest.json"))  # (changed on purpose)
    for use in (lambda r: r.check(name, r.shape(name)), lambda r: r.read(name)):
        with pytest.raises(CheckpointFileError, match=r"is stored as torch.int8 but the "
                                                      r"checkpoint has no .*q_b_proj.weight_scale"):
            use(reader_of(path))


def test_transformers_reads_the_fp8_block_export_with_our_logits(exports):
    """transformers' DeepseekV3ForCausalLM (FineGrainedFP8, dequantised on load) and our load_hf
    give the same logits from the fp8-block export (float32, 1e-5 relative)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from megatron_dsv3.checkpoint.hf import config_from_hf, load_hf
    from megatron_dsv3.model import build_model

    path = exports["fp8-block"][0]
    hf = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=FineGrainedFP8Config(dequantize=True),
        dtype=torch.float32).eval()
    ours = build_model(config_from_hf(path, dtype=torch.float32, mtp=False)).eval()
    load_hf(ours, path, skip_mtp=True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids, torch.arange(16).expand(2, 16), None)
        b = hf(input_ids=ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
    w = hf.model.layers[0].self_attn.q_b_proj.weight
    assert w.dtype == torch.float32 and torch.equal(
        w, reader_of(path).read("model.layers.0.self_attn.q_b_proj.weight").float())


def _same_checkpoint(a: str, b: str) -> int:
    ra, rb = HFReader(a), HFReader(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for name in ra.names():
        x, y = ra._slice(name, None), rb._slice(name, None)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.element_size() == 1
                                                  else x, y.view(torch.uint8)
                                                  if y.element_size() == 1 else y), name
    return len(ra.names())


def test_trainer_and_distributed_checkpoints_export_the_same_checkpoint(trained_hf, exports,
                                                                        tmp_path):
    """The checkpoint kinds we read (a distributed checkpoint also in Megatron-LM's layout),
    holding the same weights, give the same export."""
    import dataclasses

    from megatron_dsv3.checkpoint.convert import hf_to_dist
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.export.api import checkpoint_kind, export
    from megatron_dsv3.inference.loading import load_hf_checkpoint
    from megatron_dsv3.model import build_model
    from megatron_dsv3.training.trainer import TrainArgs

    hf_dir, reference = trained_hf[0], exports["fp8-block"][0]
    dist = str(tmp_path / "dist")
    hf_to_dist(hf_dir, dist, progress=False)
    release = str(tmp_path / "megatron_lm")  # Megatron-LM's layout: release/ + tracker file
    hf_to_dist(hf_dir, release, progress=False, megatron_release=True)
    assert not os.path.isfile(os.path.join(release, ".metadata"))
    run = tmp_path / "run"
    args = TrainArgs(seed=0, save_dir=str(run), config_overrides={"ffn_hidden_size": 128})
    model = build_model(get_config(args.preset, ffn_hidden_size=128))
    model.load_state_dict(load_hf_checkpoint(hf_dir, torch.float32).state_dict())
    os.makedirs(run / "checkpoint")
    torch.save({"models": [model.state_dict()], "optimizer": {}, "step": 40,
                "rng": torch.get_rng_state(), "args": dataclasses.asdict(args), "world_size": 1},
               run / "checkpoint" / "rank0.pt")
    for name, source, kind in (("dist", dist, "dist"), ("release", release, "dist"),
                               ("trainer", str(run), "trainer")):
        assert checkpoint_kind(source) == kind
        out = str(tmp_path / f"from_{name}")
        report = export(source, out, "fp8-block", calib=CALIB, calib_seq_length=SEQ,
                        progress=False)
        assert report["checkpoint_kind"] == kind
        assert _same_checkpoint(out, reference) > 100


def test_calibration_reads_a_megatron_indexed_dataset(trained_hf, tmp_path):
    """--calib-data: windows over a Megatron indexed dataset equal the documents it was built from
    (joined by EOD); ids outside the vocabulary and a missing prefix are refused naming the flag."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_dsv3.corpus import stdlib_documents
    from megatron_dsv3.export.api import export
    from megatron_dsv3.export.quantize import indexed_batches
    from megatron_dsv3.tokenizer import EOD
    from megatron_dsv3.training.data import build_indexed_corpus

    prefix = build_indexed_corpus(str(tmp_path / "cache"), max_bytes=1 << 16, log=lambda *_: None)
    batches = indexed_batches(prefix, 256, 6, SEQ, 4)
    stream = b"".join(d + bytes([EOD]) for d in stdlib_documents(1 << 16))
    expected = torch.tensor(list(stream[:6 * (SEQ + 1)])).view(6, SEQ + 1)
    assert [b["tokens"].shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b["tokens"] for b in batches]), expected[:, :-1])
    assert torch.equal(torch.cat([b["labels"] for b in batches]), expected[:, 1:])

    out = str(tmp_path / "out")
    report = export(trained_hf[0], out, "int8-wo", calib=4, calib_data=prefix,
                    calib_seq_length=SEQ, progress=False)
    assert report["calibration_sequences"] == 4 and os.path.isdir(out)

    big = str(tmp_path / "big")
    builder = IndexedDatasetBuilder(big + ".bin", dtype=__import__("numpy").int32)
    builder.add_item(torch.tensor([5, 300, 7] * 200))
    builder.end_document()
    builder.finalize(big + ".idx")
    with pytest.raises(ValueError, match=r"--calib-data .*big holds token id 300, outside the "
                       r"model's vocabulary \[0, 256\)"):
        indexed_batches(big, 256, 2, SEQ, 2)
    with pytest.raises(ValueError, match=r"--calib-data .*nowhere.bin does not exist"):
        indexed_batches(str(tmp_path / "nowhere"), 256, 2, SEQ, 2)
    with pytest.raises(ValueError, match=r"--calib-data .* holds 600 tokens; 20 sequences of 64 "
                       r"\(--calib, --calib-seq-length\) need 1300"):
        indexed_batches(big, 1000, 20, SEQ, 2)


def test_list_formats_reports_what_modelopt_runs_here(capsys):
    from megatron_dsv3.export.__main__ import main

    assert main(["--list-formats", "--device", "cpu"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in ("fp8-block", "fp8", "int8-wo", "int4-awq"):
        assert " runs on cpu;" in lines[name]
    assert "does not run on cpu (modelopt: amax must be a CUDA tensor" in lines["nvfp4"]
    with pytest.raises(SystemExit):
        main(["--quant", "fp8"])
    assert "required: --checkpoint, --out" in capsys.readouterr().err


def test_list_formats_without_modelopt_is_an_error_message(capsys, monkeypatch):
    """The export itself named the missing [deploy] extra; --list-formats ended in a traceback."""
    from megatron_dsv3.export import quantize
    from megatron_dsv3.export.__main__ import main

    def missing():
        raise ImportError("the export needs nvidia-modelopt: pip install 'megatron-dsv3[deploy]'")

    monkeypatch.setattr(quantize, "_mtq", missing)
    assert main(["--list-formats", "--device", "cpu"]) == 1
    assert "error: the export needs nvidia-modelopt" in capsys.readouterr().err


def test_fp8_block_warns_about_rows_that_end_in_a_partial_block():
    """Written as DeepSeek writes them (our reader is exact); transformers 5.24 misreads them."""
    from types import SimpleNamespace

    from megatron_dsv3.export.formats import get_format
    from megatron_dsv3.export.hf_writer import _fmt_tensors

    fmt, q = get_format("fp8-block"), SimpleNamespace(weight_quantizers=[None])
    with pytest.warns(UserWarning, match="160 rows .* partial 128x128 block"):
        names = [n for n, _ in _fmt_tensors(fmt, "x.weight", torch.randn(160, 64), None, q)]
    assert names == ["x.weight", "x.weight_scale_inv"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(_fmt_tensors(fmt, "y.weight", torch.randn(256, 160), None, q))  # whole row blocks
        list(_fmt_tensors(fmt, "z.weight", torch.randn(64, 160), None, q))  # one block of rows


def test_calibration_of_a_trainer_checkpoint_skips_the_text_it_trained_on(tmp_path, monkeypatch,
                                                                           single_rank_world):
    """The held-out calibration text starts after the run's --corpus-bytes (it always skipped
    the default 8 MiB: a run on more had trained on its calibration text)."""
    import dataclasses

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.export import quantize
    from megatron_dsv3.export.api import export
    from megatron_dsv3.model import build_model
    from megatron_dsv3.training.trainer import TrainArgs

    run = tmp_path / "run"
    args = TrainArgs(seed=0, save_dir=str(run), corpus_bytes=10 << 20)
    os.makedirs(run / "checkpoint")
    torch.save({"models": [build_model(get_config(args.preset)).state_dict()], "optimizer": {},
                "step": 1, "rng": torch.get_rng_state(), "args": dataclasses.asdict(args),
                "world_size": 1}, run / "checkpoint" / "rank0.pt")
    seen = {}

    def calibration_batches(*a, skip_bytes, **k):
        seen["skip"] = skip_bytes
        raise ValueError("stop here")

    monkeypatch.setattr(quantize, "calibration_batches", calibration_batches)
    with pytest.raises(ValueError, match="stop here"):
        export(str(run), str(tmp_path / "out"), "fp8-block", progress=False)
    assert seen["skip"] == 10 << 20
