"""HF <-> Megatron distributed checkpoint: the conversion loads with dist_checkpointing into the
same weights load_hf gives, is laid out in the target layout's chunks, converts back bitwise, reads
checkpoints Megatron itself wrote, and refuses layouts and inputs it cannot serve."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron.core import dist_checkpointing

from megatron_dsv3.checkpoint.convert import dist_to_hf, hf_to_dist
from megatron_dsv3.checkpoint.hf_model import config_from_hf, load_hf, save_hf
from megatron_dsv3.checkpoint.hf_config import read_hf_config
from megatron_dsv3.checkpoint.safetensors_io import HFReader
from megatron_dsv3.model import build_model

from hf_checkpoints import add_mtp_layers, make_hf_checkpoint, tensors
from megatron_save import megatron_save


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("src") / "hf")
    hf = make_hf_checkpoint(path, rope_interleave=False)
    add_mtp_layers(path, hf, depth=1)
    return path


def model_from(path, dtype=torch.float32):
    return build_model(config_from_hf(path, dtype=dtype)).eval()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def stored_chunks(path):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(path).read_metadata().state_dict_metadata
    return {k: sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks) for k, v in md.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_checkpoint_loads_into_the_weights_load_hf_gives(hf_dir, tmp_path, dtype,
                                                                   single_rank_world):
    out = str(tmp_path / "dist")
    hf_to_dist(hf_dir, out, tp=2, ep=2, dtype=dtype, progress=False)
    expected = model_from(hf_dir, dtype)
    load_hf(expected, hf_dir)
    model = model_from(hf_dir, dtype)
    dist_checkpointing.load(model.sharded_state_dict(), out)
    assert_same_state(model, expected)


def test_chunks_are_the_target_layouts_pieces(hf_dir, tmp_path):
    out = str(tmp_path / "dist")
    hf_to_dist(hf_dir, out, tp=2, ep=4, progress=False)
    chunks = stored_chunks(out)
    # column-parallel: two row halves; row-parallel: two column halves; SwiGLU fc1: gate and up
    # halves of each rank; routed experts: one chunk per expert; replicated: one chunk
    assert chunks["decoder.layers.0.self_attention.linear_kv_up_proj.weight"] == [
        ((0, 0), (16, 16)), ((16, 0), (16, 16))]
    assert chunks["decoder.layers.0.self_attention.linear_proj.weight"] == [
        ((0, 0), (32, 8)), ((0, 8), (32, 8))]
    assert [c[0][0] for c in chunks["decoder.layers.0.mlp.linear_fc1.weight"]] == [0, 24, 48, 72]
    assert chunks["decoder.layers.1.mlp.experts.fc2_weight"] == [
        ((e, 0, 0), (1, 32, 16)) for e in range(8)]
    assert chunks["decoder.layers.1.mlp.router.weight"] == [((0, 0), (8, 32))]
    assert chunks["mtp.layers.0.eh_proj.weight"] == [((0, 0), (16, 64)), ((16, 0), (16, 64))]


def test_dist_to_hf_inverts_hf_to_dist_bitwise(hf_dir, tmp_path, single_rank_world):
    dist, back = str(tmp_path / "dist"), str(tmp_path / "back")
    hf_to_dist(hf_dir, dist, tp=2, ep=2, dtype=torch.float32, progress=False)
    dist_to_hf(dist, back, fp8=False, progress=False, batch_bytes=4096)
    original, exported = tensors(hf_dir), tensors(back)
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    # with FP8 the way back is save_hf's FP8 export of the same weights, bitwise
    model = model_from(hf_dir)
    load_hf(model, hf_dir)
    save_hf(model, str(tmp_path / "saved"), fp8=True, base_config=read_hf_config(hf_dir))
    dist_to_hf(dist, str(tmp_path / "back8"), fp8=True, progress=False)
    a, b = tensors(str(tmp_path / "saved")), tensors(str(tmp_path / "back8"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_power_of_2_fp8_scales_convert_back_to_the_same_weights(hf_dir, tmp_path,
                                                               single_rank_world):
    """A checkpoint with scale_fmt 'ue8m0' (power-of-2 block scales) comes back with power-of-2
    scales, says so, and holds the same weights (amax / 448 scales changed every scale and
    code). A block whose largest code was rounded to 224 has two power-of-2 encodings of the
    same values (codes c with scale s, 2c with s / 2); every other block is bit for bit."""
    from megatron_dsv3.fp8.quant import dequantize_128x128

    from hf_checkpoints import make_fp8_copy

    fp8, dist, back = (str(tmp_path / n) for n in ("fp8", "dist", "back"))
    make_fp8_copy(hf_dir, fp8, scale_fmt="ue8m0")
    hf_to_dist(fp8, dist, dtype=torch.float32, progress=False)
    dist_to_hf(dist, back, fp8=True, progress=False)
    original, exported = tensors(fp8), tensors(back)
    assert original.keys() == exported.keys()
    same = 0
    for k in (k for k in original if original[k].dtype == torch.float8_e4m3fn):
        s_old, s_new = original[k + "_scale_inv"], exported[k + "_scale_inv"]
        assert torch.equal(torch.frexp(s_new).mantissa, torch.full_like(s_new, 0.5))  # 2^p
        assert torch.equal(dequantize_128x128(original[k], s_old),
                           dequantize_128x128(exported[k], s_new)), k
        same += torch.equal(original[k].view(torch.uint8), exported[k].view(torch.uint8))
    assert same > 0
    assert read_hf_config(back)["quantization_config"]["scale_fmt"] == "ue8m0"
    with pytest.warns(UserWarning, match="--dtype fp32"):  # BF16 values cannot come back exact
        hf_to_dist(fp8, str(tmp_path / "dist16"), dtype=torch.bfloat16, progress=False)
    config = read_hf_config(fp8)
    config["quantization_config"]["scale_fmt"] = "e8m0-other"
    with pytest.raises(ValueError, match="scale_fmt"):
        config_from_hf(config)


def test_checkpoint_written_by_megatron_converts_to_the_original_hf(hf_dir, tmp_path,
                                                                    single_rank_world):
    model = model_from(hf_dir)
    load_hf(model, hf_dir)
    saved = tmp_path / "megatron"
    saved.mkdir()
    megatron_save(model, saved)
    back = str(tmp_path / "back")
    dist_to_hf(str(saved), back, hf_config=hf_dir, fp8=False, progress=False)
    original, exported = tensors(hf_dir), tensors(back)
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_command_line_converts_both_ways_with_progress(hf_dir, tmp_path):
    dist, back = str(tmp_path / "dist"), str(tmp_path / "back")
    run = [sys.executable, "-m", "megatron_dsv3.checkpoint", "convert"]
    to_dist = subprocess.run(run + ["--to", "dist", "--input", hf_dir, "--output", dist, "--tp", "2",
                                    "--pp", "2", "--ep", "4", "--dtype", "fp32"],
                             capture_output=True, text=True, timeout=300)
    assert to_dist.returncode == 0, to_dist.stderr
    assert "hf->dist:" in to_dist.stderr and "100.0%" in to_dist.stderr
    to_hf = subprocess.run(run + ["--to", "hf", "--input", dist, "--output", back, "--no-fp8",
                                  "--max-shard-size", "20KB"], capture_output=True, text=True,
                           timeout=300)
    assert to_hf.returncode == 0, to_hf.stderr
    assert "dist->hf:" in to_hf.stderr
    original, exported = tensors(hf_dir), tensors(back)
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert len([f for f in os.listdir(back) if f.endswith(".safetensors")]) > 1
    misuse = subprocess.run(run + ["--to", "hf", "--input", dist, "--output", back, "--tp", "2"],
                            capture_output=True, text=True, timeout=300)
    assert misuse.returncode == 2 and "--tp applies to --to dist only" in misuse.stderr


def test_command_line_reports_bad_input_without_a_traceback(hf_dir, tmp_path, capsys):
    from megatron_dsv3.checkpoint.__main__ import main

    out = str(tmp_path / "dist")
    assert main(["convert", "--to", "dist", "--input", hf_dir, "--output", out, "--ep", "3",
                 "--quiet"]) == 1
    assert "error: --ep 3 does not divide" in capsys.readouterr().err  # (the flag as typed)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", "--to", "hf", "--input", str(empty), "--output", out]) == 1
    assert f"{empty} has no hf_config.json" in capsys.readouterr().err
    trainer = tmp_path / "run" / "checkpoints" / "step_000001"  # our trainer's layout
    trainer.mkdir(parents=True)
    (trainer / "rank0.pt").write_bytes(b"")
    assert main(["convert", "--to", "hf", "--input", str(trainer), "--output", out]) == 1
    assert "holds our trainer's checkpoint" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.parametrize("where,message", [
    ("same", "is the input itself"), ("inside", "lies inside the input"),
    ("parent", "contains the input")])
def test_conversion_refuses_an_output_overlapping_its_input(hf_dir, tmp_path, capsys, where,
                                                           message):
    """--overwrite with an output equal to, inside or above the input would delete the source."""
    from megatron_dsv3.checkpoint.__main__ import main

    src = tmp_path / "src" / "hf"
    shutil.copytree(hf_dir, src)
    before = sorted(os.listdir(src))
    out = {"same": src, "inside": src / "dist", "parent": src.parent}[where]
    for to in ("dist", "hf"):
        assert main(["convert", "--to", to, "--input", str(src), "--output", str(out),
                     "--overwrite", "--quiet"]) == 1
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(src)) == before


@pytest.mark.parametrize("layout,message", [
    (dict(tp=3), r"tensor_model_parallel_size=3 does not divide num_attention_heads=2; allowed "
                 r"values: \[1, 2\]"),
    (dict(ep=3), r"expert_model_parallel_size=3 does not divide num_moe_experts=8"),
    (dict(pp=3), r"pipeline_model_parallel_size=3 does not divide num_layers=2"),
])
def test_layouts_that_cannot_hold_the_model_are_refused(hf_dir, tmp_path, layout, message):
    with pytest.raises(ValueError, match=message):
        hf_to_dist(hf_dir, str(tmp_path / "dist"), progress=False, **layout)
    assert not os.listdir(tmp_path)


def test_interrupted_conversion_leaves_no_checkpoint(hf_dir, tmp_path, monkeypatch):
    calls = []
    real = HFReader.read

    def failing(self, name, region=None):
        calls.append(name)
        if len(calls) == 20:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the conversion
        return real(self, name, region)

    monkeypatch.setattr(HFReader, "read", failing)
    with pytest.raises(KeyboardInterrupt):
        hf_to_dist(hf_dir, str(tmp_path / "dist"), progress=False)
    assert not os.listdir(tmp_path)


def test_dist_checkpoint_without_a_model_tensor_is_refused(hf_dir, tmp_path, single_rank_world):
    model = build_model(config_from_hf(hf_dir, dtype=torch.float32, mtp_num_layers=None))
    load_hf(model, hf_dir, allow_unused=True)
    saved = tmp_path / "megatron"
    saved.mkdir()
    megatron_save(model, saved)  # no MTP layer, but hf_dir's config has one
    with pytest.raises(ValueError, match=r"tensor mtp.layers.0.enorm.weight is missing from the "
                                         r"distributed checkpoint"):
        dist_to_hf(str(saved), str(tmp_path / "back"), hf_config=hf_dir, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["megatron"]


def test_checkpoint_saved_by_transformers_without_mtp_weights_converts_both_ways(tmp_path):
    """transformers writes no MTP weights but keeps num_nextn_predict_layers=1: the conversion
    leaves MTP out with a warning, and the way back gives the same tensors."""
    src = str(tmp_path / "hf")
    make_hf_checkpoint(src, rope_interleave=False, num_nextn_predict_layers=1)
    with pytest.warns(UserWarning, match="holds no MTP weights"):
        hf_to_dist(src, str(tmp_path / "dist"), dtype=torch.float32, progress=False)
    dist_to_hf(str(tmp_path / "dist"), str(tmp_path / "back"), fp8=False, progress=False)
    assert read_hf_config(str(tmp_path / "back"))["num_nextn_predict_layers"] == 0
    original, back = tensors(src), tensors(str(tmp_path / "back"))
    assert set(original) == set(back)
    assert all(torch.equal(original[k].float(), back[k].float()) for k in original)


def test_megatron_release_layout_is_what_megatron_lm_reads_and_ours_read_it_too(
        hf_dir, tmp_path, single_rank_world):
    """--megatron-release: OUTPUT/release and a tracker saying "release", the layout Megatron-LM's
    --load / --pretrained-checkpoint read (a bare distributed checkpoint has no tracker, and
    Megatron-LM then starts from random weights with a warning); our loaders take either path."""
    from megatron_dsv3.checkpoint import dist as dist_io
    from megatron_dsv3.checkpoint.convert import dist_checkpoint_dir

    out = str(tmp_path / "dist")
    hf_to_dist(hf_dir, out, dtype=torch.float32, progress=False, megatron_release=True)
    with open(os.path.join(out, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "release"
    assert dist_checkpoint_dir(out) == os.path.join(out, "release")
    assert os.path.isfile(os.path.join(out, "release", "metadata.json"))
    expected = model_from(hf_dir, torch.float32)
    load_hf(expected, hf_dir)
    model = model_from(hf_dir, torch.float32)
    dist_io.load([model], out)
    assert_same_state(model, expected)
    dist_to_hf(out, str(tmp_path / "back"), fp8=False, progress=False)
    original, exported = tensors(hf_dir), tensors(str(tmp_path / "back"))
    assert all(torch.equal(original[k], exported[k]) for k in original)
