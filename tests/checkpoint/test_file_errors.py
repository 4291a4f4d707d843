"""Bad checkpoint files are refused by name: truncated and tiny shards, malformed JSON, configs
missing a field, empty and truncated trainer checkpoints, FP8 block scales that would turn weights
into zeros or NaN (int32, NaN, zero, negative, wrong grid), and full disks while writing; the
command lines exit nonzero with the message instead of writing or generating garbage."""

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from megatron_dsv3.checkpoint.errors import CheckpointFileError, reading, writing
from megatron_dsv3.checkpoint.hf_config import config_from_hf, read_hf_config
from megatron_dsv3.checkpoint.safetensors_io import HFReader, ShardedSafetensorsWriter, read_header
from megatron_dsv3.fp8.quant import quantize_128x128

from hf_checkpoints import make_fp8_copy, make_hf_checkpoint, rewrite, tensors


# -- small files ----------------------------------------------------------------------------------
def fp8_file(path, scale=None, weight=None):
    """model.safetensors with an FP8 weight w.weight (block scales `scale`, default: its own)."""
    q, s = quantize_128x128(torch.randn(200, 100) if weight is None else weight)
    save_file({"w.weight": q, "w.weight_scale_inv": s if scale is None else scale},
              str(path / "model.safetensors"))
    return str(path / "model.safetensors")


def test_truncated_shard_names_the_file(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(8)}, str(file))
    data = file.read_bytes()
    file.write_bytes(data[:-40])
    with pytest.raises(CheckpointFileError, match=rf"{file} is truncated: its header describes "
                                                  r"288 bytes of tensor data but it holds 248"):
        HFReader(str(tmp_path))
    file.write_bytes(data[:12])  # cut inside the header
    with pytest.raises(CheckpointFileError, match=rf"{file} is truncated: its header length says"):
        read_header(str(file))


def test_tiny_shard_names_the_file(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    (tmp_path / "two.safetensors").write_bytes(b"\x01\x02\x03")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    reader = HFReader(str(tmp_path))
    assert torch.equal(reader.read("a"), torch.zeros(2))
    with pytest.raises(CheckpointFileError, match=r"two.safetensors is too short to be a "
                                                  r"safetensors file: 3 bytes"):
        reader.check("b", (2,))


def test_header_that_is_not_json_names_the_file(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(CheckpointFileError, match=rf"{file} is not a readable safetensors shard: "
                                                  r"malformed JSON"):
        HFReader(str(tmp_path))


def test_malformed_index_names_the_file(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "one.safetensors",')
    with pytest.raises(CheckpointFileError, match=rf"{index} is not a readable safetensors index: "
                                                  r"malformed JSON \(.* line 1 column"):
        HFReader(str(tmp_path))
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointFileError, match=rf"{index} is not a safetensors index: expected "
                                                  r"a JSON object with a \"weight_map\""):
        HFReader(str(tmp_path))


def test_malformed_config_names_the_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"vocab_size": 64, "hidden_size": }')
    with pytest.raises(CheckpointFileError, match=rf"{config} is not a readable HF config: "
                                                  r"malformed JSON"):
        read_hf_config(str(tmp_path))
    config.write_text("")
    with pytest.raises(CheckpointFileError, match=rf"{config} is not a readable HF config: the "
                                                  r"file is empty \(0 bytes\)"):
        config_from_hf(str(tmp_path))


def test_config_missing_kv_lora_rank_names_the_field_and_the_file(tmp_path):
    make_hf_checkpoint(str(tmp_path / "hf"))
    config = tmp_path / "hf" / "config.json"
    hf = json.loads(config.read_text())
    del hf["kv_lora_rank"]
    config.write_text(json.dumps(hf))
    with pytest.raises(CheckpointFileError, match=rf"{config} lacks the required field "
                                                  r"kv_lora_rank$"):
        config_from_hf(str(tmp_path / "hf"))
    del hf["v_head_dim"]
    with pytest.raises(ValueError, match=r"HF config lacks the required field kv_lora_rank "
                                         r"\(and v_head_dim\)"):
        config_from_hf(hf)


def test_reading_keeps_our_own_errors_and_programming_errors():
    with pytest.raises(ValueError, match="^tensor x: already descriptive$"):
        with reading("f.safetensors"):
            raise ValueError("tensor x: already descriptive")
    with pytest.raises(KeyError):
        with reading("f.safetensors"):
            raise KeyError("a bug, not a bad file")


# -- trainer checkpoints (generate's loader) --------------------------------------------------------
def test_empty_and_truncated_rank0_pt_name_the_file_and_generate_exits_2(tmp_path, capsys):
    from megatron_dsv3.generate import main
    from megatron_dsv3.inference.loading import load_for_generation

    empty, truncated = tmp_path / "empty", tmp_path / "truncated"
    empty.mkdir()
    (empty / "rank0.pt").write_bytes(b"")
    (truncated / "checkpoint").mkdir(parents=True)
    file = truncated / "checkpoint" / "rank0.pt"
    torch.save({"models": [{"w": torch.randn(1000)}], "args": {}, "world_size": 1}, file)
    file.write_bytes(file.read_bytes()[:2000])
    with pytest.raises(CheckpointFileError, match=rf"{empty / 'rank0.pt'} is not a readable "
                                                  r"trainer checkpoint: the file is empty"):
        load_for_generation(str(empty))
    with pytest.raises(CheckpointFileError, match=rf"{file} is not a readable trainer checkpoint: "
                                                  r"corrupt or truncated"):
        load_for_generation(str(truncated))
    for path, message in [(empty, "the file is empty"), (truncated, "corrupt or truncated")]:
        assert main(["--checkpoint", str(path), "--prompt", "a", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "rank0.pt is not a readable trainer checkpoint" in err
        assert message in err and "Traceback" not in err


# -- FP8 block scales -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad,message", [
    (lambda s: s.to(torch.int32), r"is stored as torch.int32; block scales must be float32 or "
                                  r"bfloat16"),
    (lambda s: s.index_fill(1, torch.tensor([0]), float("nan")),
     r"holds 2 block scale\(s\) that are not finite and > 0, e.g. nan at block \[0, 0\]"),
    (lambda s: s.index_fill(0, torch.tensor([1]), 0.0),
     r"holds 1 block scale\(s\) that are not finite and > 0, e.g. 0.0 at block \[1, 0\]"),
    (lambda s: -s, r"holds 2 block scale\(s\) that are not finite and > 0, e.g. -"),
    (lambda s: s.index_fill(0, torch.tensor([1]), float("inf")), r"holds 1 block scale\(s\) that are not finite and > 0, e.g. inf at block \[1, 0\]"),
    (lambda s: s[:1], r"has shape \[1, 1\]; a \[200, 100\] weight in 128x128 blocks needs \[2, 1\]"),
])
def test_bad_fp8_scales_name_the_tensor_and_the_file(tmp_path, bad, message):
    _, good = quantize_128x128(torch.randn(200, 100))
    file = fp8_file(tmp_path, bad(good))
    reader = HFReader(str(tmp_path))
    with pytest.raises(CheckpointFileError, match=rf"^tensor w.weight_scale_inv in {file} "
                                                  f"{message}"):
        reader.check("w.weight", (200, 100))
    with pytest.raises(CheckpointFileError, match=message):
        reader.read("w.weight", (slice(0, 10), slice(0, 10)))


def test_bfloat16_scales_are_accepted(tmp_path):
    w = torch.randn(200, 100)
    q, s = quantize_128x128(w)
    fp8_file(tmp_path, s.to(torch.bfloat16), w)
    reader = HFReader(str(tmp_path))
    reader.check("w.weight", (200, 100))
    assert torch.allclose(reader.read("w.weight"), w, rtol=0.1, atol=0.05)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    make_hf_checkpoint(str(root / "src"), vocab_size=256)
    make_fp8_copy(str(root / "src"), str(root / "fp8"))
    return str(root / "fp8")


def corrupt_scale(src, dst, how):
    shutil.copytree(src, dst)
    new = tensors(dst)
    name = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    new[name] = how(new[name])
    rewrite(dst, new)
    return name


@pytest.mark.parametrize("how,message", [
    (lambda s: s.to(torch.int32), r"is stored as torch.int32"),
    (lambda s: torch.full_like(s, float("nan")),
     r"holds 1 block scale\(s\) that are not finite and > 0, e.g. nan at block \[0, 0\]"),
])
def test_convert_and_generate_exit_nonzero_on_bad_scales(fp8_dir, tmp_path, capsys, how, message,
                                                         single_rank_world):
    from megatron_dsv3.checkpoint.__main__ import main as convert
    from megatron_dsv3.generate import main as generate

    bad = str(tmp_path / "bad")
    name = corrupt_scale(fp8_dir, bad, how)
    expected = rf"tensor {name} in {bad}/model.safetensors {message}"
    out = str(tmp_path / "dist")
    assert convert(["convert", "--to", "dist", "--input", bad, "--output", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(expected, err), err
    assert not os.path.exists(out)
    assert generate(["--checkpoint", bad, "--prompt", "a", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(expected, err), err


def test_convert_command_line_reports_a_truncated_shard(fp8_dir, tmp_path, capsys):
    from megatron_dsv3.checkpoint.__main__ import main as convert

    bad = tmp_path / "bad"
    shutil.copytree(fp8_dir, bad)
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert convert(["convert", "--to", "dist", "--input", str(bad), "--output",
                    str(tmp_path / "dist"), "--quiet"]) == 1
    assert f"error: {shard} is truncated: its header describes" in capsys.readouterr().err


def test_truncated_distributed_checkpoint_files_name_the_file(fp8_dir, tmp_path,
                                                               single_rank_world):
    from megatron_dsv3.checkpoint.convert import dist_to_hf, hf_to_dist

    dist = tmp_path / "dist"
    hf_to_dist(fp8_dir, str(dist), progress=False)
    metadata, broken = tmp_path / "metadata", tmp_path / "data"
    shutil.copytree(dist, metadata)
    (metadata / ".metadata").write_bytes((dist / ".metadata").read_bytes()[:100])
    # the manifest of the published checkpoint names the truncated file first ...
    with pytest.raises(CheckpointFileError, match=rf"{metadata / '.metadata'} has 100 bytes; "
                                                  r"the manifest says"):
        dist_to_hf(str(metadata), str(tmp_path / "out"), progress=False)
    # ... and without a manifest (a checkpoint Megatron wrote) the reader does
    (metadata / "checkpoint_manifest.json").unlink()
    with pytest.raises(CheckpointFileError, match=rf"{metadata / '.metadata'} is not a readable "
                                                  r"distributed checkpoint metadata: corrupt"):
        dist_to_hf(str(metadata), str(tmp_path / "out"), progress=False)
    shutil.copytree(dist, broken)
    for file in broken.glob("*.distcp"):
        file.write_bytes(file.read_bytes()[:10])
    with pytest.raises(CheckpointFileError, match=rf"{broken}/__0_\d+.distcp has 10 bytes"):
        dist_to_hf(str(broken), str(tmp_path / "out"), progress=False)
    (broken / "checkpoint_manifest.json").unlink()
    with pytest.raises(CheckpointFileError, match=rf"{broken} is not a readable distributed "
                                                  r"checkpoint: corrupt or truncated"):
        dist_to_hf(str(broken), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


# -- full disks -------------------------------------------------------------------------------------
@pytest.fixture
def small_disk():
    """A 64 KiB tmpfs (needs root and mount); skipped when it cannot be mounted."""
    path = tempfile.mkdtemp(prefix="dsv3-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path],
                             capture_output=True, text=True)
    if mounted.returncode:
        os.rmdir(path)
        pytest.skip(f"cannot mount a small tmpfs to fill ({mounted.stderr.strip() or 'no root'}); "
                    "the /dev/full test covers the raw OSError")
    yield path
    subprocess.run(["umount", "-l", path], check=True)
    os.rmdir(path)


def test_raw_enospc_names_the_file(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError, match=r"no space left on device while writing /dev/full$") as err:
        with writing("/dev/full") as file, open(file, "wb") as f:
            f.write(b"x" * 10000)
    assert err.value.errno == errno.ENOSPC
    assert os.path.exists("/dev/full")  # (a device is never removed)


def test_torch_save_on_a_full_disk_names_the_file_and_leaves_nothing(small_disk):
    file = os.path.join(small_disk, "rank0.pt")
    with pytest.raises(OSError, match=rf"^\[Errno 28\] no space left on device while writing "
                                      rf"{file}$") as err:
        with writing(file):
            torch.save({"w": torch.randn(100_000)}, file)
    assert err.value.errno == errno.ENOSPC and os.listdir(small_disk) == []
    with writing(file):  # the space is free again (not held by the failed writer): same call works
        torch.save({"w": torch.randn(100)}, file)
    assert torch.load(file)["w"].shape == (100,)
    os.remove(file)
    with pytest.raises(RuntimeError, match="inline_container.cc|iostream error"):
        torch.save({"w": torch.randn(100_000)}, file)  # what torch itself says


def test_safetensors_writer_on_a_full_disk_names_the_shard_and_leaves_nothing(small_disk):
    plan = [(n, torch.float32, (4000,)) for n in "abcde"]
    writer = ShardedSafetensorsWriter(small_disk, plan, max_shard_bytes=20_000)
    with pytest.raises(OSError, match=r"no space left on device while writing .*"
                                      r"model-0000\d-of-00005.safetensors") as err:
        for name, _, shape in plan:
            writer.write(name, torch.randn(shape))
        writer.finish()
    assert err.value.errno == errno.ENOSPC
    complete = sorted(os.listdir(small_disk))
    for file in complete:  # only whole shards are left (atomic_directory removes those too)
        read_header(os.path.join(small_disk, file))


def test_a_failed_block_keeps_a_file_it_did_not_touch(tmp_path):
    file = tmp_path / "keep.pt"
    file.write_bytes(b"old")
    with pytest.raises(ValueError):
        with writing(str(file)):
            raise ValueError("failed before writing")
    assert file.read_bytes() == b"old"
    with pytest.raises(ValueError):
        with writing(str(file)):
            file.write_bytes(b"half")
            raise ValueError("failed while writing")
    assert not file.exists()
