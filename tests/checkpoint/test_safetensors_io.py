"""Streaming safetensors shards, FP8 region reads, errors that name tensor and file, atomic commits."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dsv3.checkpoint.commit import atomic_directory
from megatron_dsv3.checkpoint.safetensors_io import HFReader, ShardedSafetensorsWriter
from megatron_dsv3.fp8.quant import quantize_128x128

from hf_checkpoints import naive_dequantize


def test_streamed_shards_read_back_bitwise_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(300).to(torch.bfloat16),
               "c": quantize_128x128(torch.randn(130, 260))[0], "d": torch.arange(7),
               "e": torch.randn(2, 3, 4).half()}
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(str(tmp_path), plan, max_shard_bytes=34_000)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 2 and files[0] == "model-00001-of-00002.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    for k, v in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][k]), framework="pt") as f:
            got = f.get_tensor(k)
        assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k


def test_writer_refuses_unplanned_or_missing_tensors(tmp_path):
    writer = ShardedSafetensorsWriter(str(tmp_path), [("a", torch.float32, (2,)),
                                                      ("b", torch.float32, (2,))])
    with pytest.raises(ValueError, match="b"):
        writer.write("b", torch.zeros(2))  # out of order
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="plan expects b"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="tensor b and 0 more were never written"):
        writer.finish()
    writer.abort()


def _fp8_checkpoint(path, w):
    q, s = quantize_128x128(w)
    save_file({"w.weight": q, "w.weight_scale_inv": s, "n.weight": torch.randn(4)},
              str(path / "model.safetensors"))
    return naive_dequantize(q, s)


def test_fp8_regions_dequantise_like_the_whole_tensor(tmp_path):
    w = torch.randn(300, 270) * torch.logspace(-2, 2, 270)  # blocks with very different scales
    full = _fp8_checkpoint(tmp_path, w)
    reader = HFReader(str(tmp_path))
    assert torch.equal(reader.read("w.weight"), full)
    assert (full - w).abs().max() > 0  # a lossy copy: the test compares against the blocks
    for rows, cols in [((0, 300), (0, 270)), ((5, 140), (100, 260)), ((128, 256), (0, 1)),
                       ((299, 300), (269, 270)), ((17, 18), (3, 250))]:
        region = (slice(*rows), slice(*cols))
        assert torch.equal(reader.read("w.weight", region), full[region]), region


def test_missing_shard_names_the_tensor_and_the_file(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    reader = HFReader(str(tmp_path))
    with pytest.raises(ValueError, match=r"tensor b: shard file .*two.safetensors is missing"):
        reader.read("b")
    with pytest.raises(ValueError, match=r"tensor c is missing .*model.safetensors.index.json"):
        reader.check("c", (2,))


def test_wrong_shape_and_wrong_scale_blocks_name_the_tensor_and_the_file(tmp_path):
    q, s = quantize_128x128(torch.randn(200, 100))
    save_file({"w.weight": q, "w.weight_scale_inv": s[:1], "v.weight": q.clone(),
               "u.weight": torch.zeros(3, 4)}, str(tmp_path / "model.safetensors"))
    reader = HFReader(str(tmp_path))
    with pytest.raises(ValueError, match=r"u.weight in .*model.safetensors has shape \[3, 4\]"):
        reader.check("u.weight", (4, 3))
    with pytest.raises(ValueError, match=r"w.weight_scale_inv in .*model.safetensors has shape "
                                         r"\[1, 1\]; a \[200, 100\] weight in 128x128 blocks needs \[2, 1\]"):
        reader.check("w.weight", (200, 100))
    with pytest.raises(ValueError, match=r"FP8 tensor v.weight in .*model.safetensors has no "
                                         r"v.weight_scale_inv"):
        reader.check("v.weight", (200, 100))


def test_failed_write_leaves_the_last_good_directory_untouched(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(str(target)) as tmp:
        (open(os.path.join(tmp, "good"), "w")).write("v1")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(str(target)) as tmp:
            (open(os.path.join(tmp, "good"), "w")).write("v2 half")
            raise RuntimeError("interrupted")
    assert (target / "good").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no half-written sibling left
    with atomic_directory(str(target)) as tmp:
        (open(os.path.join(tmp, "good"), "w")).write("v3")
    assert (target / "good").read_text() == "v3" and sorted(os.listdir(tmp_path)) == ["ckpt"]
    with pytest.raises(ValueError, match="exists"):
        with atomic_directory(str(target), overwrite=False):
            pass


def test_overwrite_replaces_only_empty_directories_and_ours(tmp_path, capsys):
    """A typo in --output must not delete a source tree or a file: --overwrite replaces an empty
    directory or one we wrote (it holds our manifest), and refuses anything else untouched."""
    from megatron_dsv3.checkpoint.__main__ import main as convert

    from hf_checkpoints import make_hf_checkpoint

    source = tmp_path / "hf"
    make_hf_checkpoint(str(source))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for target, message in ((notes, "holds files but no checkpoint_manifest.json"),
                            (a_file, "exists and is not a directory")):
        code = convert(["convert", "--to", "dist", "--input", str(source), "--output", str(target),
                        "--overwrite", "--quiet"])
        assert code == 1 and message in capsys.readouterr().err
    assert (notes / "notes.txt").read_text() == "mine" and a_file.read_text() == "mine"
    out = tmp_path / "dist"
    (tmp_path / "dist").mkdir()  # empty: replaced
    for _ in range(2):  # then ours: replaced again
        assert convert(["convert", "--to", "dist", "--input", str(source), "--output", str(out),
                        "--overwrite", "--quiet"]) == 0
    assert (out / ".metadata").is_file()
    # a trainer's published step directory (named by its tracker) holds a manifest too
    step = out.rename(tmp_path / "step_000001")
    (tmp_path / "latest.json").write_text(
        '{"latest": "step_000001", "step": 1, "kept": ["step_000001"]}')
    assert convert(["convert", "--to", "dist", "--input", str(source), "--output", str(step),
                    "--overwrite", "--quiet"]) == 1
    assert "is a published checkpoint of a training run" in capsys.readouterr().err


@pytest.mark.parametrize("reader", ["config_from_hf", "export.checkpoint_kind",
                                    "load_for_generation"])
def test_loaders_put_back_a_directory_an_interrupted_fallback_commit_renamed_aside(
        tmp_path, monkeypatch, request, reader):
    """On a filesystem without the directory exchange, a commit over an existing checkpoint
    renames the old one aside, then the new one into place; killed between the two, the name is
    missing. Every reader must put the old directory back before it looks for it: the loaders
    that read config.json first (config_from_hf, as hf_to_dist, load_hf and from_hf do), the
    export's checkpoint check and the generation loader (which look for the directory first)."""
    from megatron_dsv3.checkpoint import commit
    from megatron_dsv3.checkpoint.hf_config import config_from_hf

    from hf_checkpoints import make_hf_checkpoint

    path = tmp_path / "hf"
    make_hf_checkpoint(str(path))
    commit.write_manifest(str(path))  # (one of ours: --overwrite replaces only those)
    before = sorted(os.listdir(path))
    monkeypatch.setattr(commit, "exchange_directories", lambda a, b: False)
    real = commit.fault_point

    def killed_between_the_renames(label):
        real(label)
        if "rename the new directory into place (fallback)" in label:
            raise SystemExit("killed")

    monkeypatch.setattr(commit, "fault_point", killed_between_the_renames)
    with pytest.raises(SystemExit):
        with atomic_directory(str(path)) as tmp:
            (Path(tmp) / "config.json").write_text("{}")
    monkeypatch.setattr(commit, "fault_point", real)
    assert not path.exists()
    if reader == "config_from_hf":
        assert config_from_hf(str(path)).num_layers >= 1
    elif reader == "export.checkpoint_kind":
        from megatron_dsv3.export.api import checkpoint_kind

        assert checkpoint_kind(str(path)) == "hf"
    else:
        from megatron_dsv3.inference.loading import load_for_generation

        request.getfixturevalue("single_rank_world")
        model, _ = load_for_generation(str(path), dtype=torch.float32)
        assert sum(p.numel() for p in model.parameters()) > 0
    assert sorted(os.listdir(path)) == before
