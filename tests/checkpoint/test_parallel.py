"""load_hf / save_hf / distributed checkpoints on a TP2 x PP2 x EP2 layout (4 gloo processes): each
rank holds exactly its slice of the single-rank weights, the converted distributed checkpoint loads
into the same slices, and both exports from the parallel model reproduce the HF checkpoint."""

import os

import torch

from megatron_dsv3.checkpoint.convert import dist_to_hf, hf_to_dist
from megatron_dsv3.checkpoint.hf_model import config_from_hf, load_hf, local_shards, save_hf
from megatron_dsv3.checkpoint.hf_config import read_hf_config
from megatron_dsv3.checkpoint.mapping import model_maps, tp_chunks
from megatron_dsv3.model import build_model
from megatron_dsv3.testing.distributed import run_distributed

from hf_checkpoints import add_mtp_layers, make_hf_checkpoint, tensors

LAYOUT = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
              expert_model_parallel_size=2, expert_tensor_parallel_size=1)


def _rank_slices(rank, world, hf_dir, dist_dir, reference, out_dir):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_dsv3.dispatch import initialize_dispatch_groups

    initialize_dispatch_groups()
    sizes = {k: v for k, v in LAYOUT.items()}
    config = config_from_hf(hf_dir, dtype=torch.float32, **sizes)
    pp = parallel_state.get_pipeline_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_rank()

    def build():
        return build_model(config, pre_process=pp == 0, post_process=pp == 1)

    model = build()
    load_hf(model, hf_dir)

    # 1. slices by module, independent of the sharded_state_dict offsets
    checked = 0
    for layer in model.decoder.layers:
        g = layer.layer_number - 1
        ref = lambda name: reference[f"decoder.layers.{g}.{name}"]  # noqa: E731
        attn = layer.self_attention
        rows = ref("self_attention.linear_q_up_proj.weight").chunk(2)[tp]
        assert torch.equal(attn.linear_q_up_proj.weight, rows)
        assert torch.equal(attn.linear_proj.weight, ref("self_attention.linear_proj.weight").chunk(2, 1)[tp])
        assert torch.equal(attn.linear_kv_down_proj.weight, ref("self_attention.linear_kv_down_proj.weight"))
        if layer.is_moe_layer:
            experts = layer.mlp.experts
            offset, n = experts.local_expert_offset, experts.num_local_experts
            assert torch.equal(experts.fc1_weight, ref("mlp.experts.fc1_weight")[offset:offset + n])
            assert torch.equal(experts.fc2_weight, ref("mlp.experts.fc2_weight")[offset:offset + n])
        else:
            gate, up = ref("mlp.linear_fc1.weight").chunk(2)
            assert torch.equal(layer.mlp.linear_fc1.weight, torch.cat([gate.chunk(2)[tp], up.chunk(2)[tp]]))
        checked += 1
    if pp == 0:
        assert torch.equal(model.embedding.word_embeddings.weight,
                           reference["embedding.word_embeddings.weight"].chunk(2)[tp])
    else:
        assert torch.equal(model.output_layer.weight, reference["output_layer.weight"].chunk(2)[tp])
        assert torch.equal(model.mtp.layers[0].eh_proj.weight,
                           reference["mtp.layers.0.eh_proj.weight"].chunk(2)[tp])

    # 2. every shard equals its region of the single-rank tensor; main replicas are conversion chunks
    maps = model_maps(config)
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    for sh in local_shards(model):
        region = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, sh.local_shape))
        assert torch.equal(sh.data, reference[sh.key][region]), sh.key
        if is_main_replica(sh.replica_id):
            chunks = tp_chunks(maps[sh.key], 2)
            pieces = [c for c in chunks if all(o <= a and a + s <= o + n for o, n, a, s in
                                               zip(sh.global_offset, sh.local_shape, c[0], c[1]))]
            assert sum(torch.Size(c[1]).numel() for c in pieces) == sh.data.numel(), sh.key

    # 3. the converted distributed checkpoint loads into the same slices
    other = build()
    dist_checkpointing.load(other.sharded_state_dict(metadata={}), dist_dir)
    for a, b in zip(model.state_dict().items(), other.state_dict().items()):
        if isinstance(a[1], torch.Tensor):
            assert torch.equal(a[1], b[1]), a[0]

    # 4. exports from the parallel model: HF (gathered to rank 0) and Megatron's own save
    save_hf(model, os.path.join(out_dir, "hf"), fp8=False, base_config=read_hf_config(hf_dir))
    from megatron_save import megatron_save

    if rank == 0:
        os.makedirs(os.path.join(out_dir, "megatron"))
    torch.distributed.barrier()
    megatron_save(model, os.path.join(out_dir, "megatron"))
    return checked


def test_tp2_pp2_ep2_slices_loads_and_exports(tmp_path, single_rank_world):
    hf_dir = str(tmp_path / "hf")
    hf = make_hf_checkpoint(hf_dir, hidden_size=32, num_attention_heads=2, vocab_size=64,
                            intermediate_size=48, n_shared_experts=2)
    add_mtp_layers(hf_dir, hf, depth=1)
    single = build_model(config_from_hf(hf_dir, dtype=torch.float32))
    load_hf(single, hf_dir)
    reference = {k: v for k, v in single.state_dict().items() if isinstance(v, torch.Tensor)}
    dist_dir = str(tmp_path / "dist")
    hf_to_dist(hf_dir, dist_dir, tp=2, pp=2, ep=2, dtype=torch.float32, progress=False)
    out = str(tmp_path / "out")
    os.makedirs(out)
    checked = run_distributed(_rank_slices, 4, args=(hf_dir, dist_dir, reference, out),
                              megatron_parallel=LAYOUT, timeout=240)
    assert checked == [1, 1, 1, 1]  # one decoder layer per stage
    original = tensors(hf_dir)
    exported = tensors(os.path.join(out, "hf"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    dist_to_hf(os.path.join(out, "megatron"), str(tmp_path / "back"), hf_config=hf_dir, fp8=False,
               progress=False)
    back = tensors(str(tmp_path / "back"))
    assert all(torch.equal(original[k], back[k]) for k in original)


def _rank_failing_saves(rank, world, hf_dir, out_dir):
    import errno
    import time

    import pytest

    from megatron_dsv3.checkpoint import hf_model
    from megatron_dsv3.dispatch import initialize_dispatch_groups

    initialize_dispatch_groups()
    model = build_model(config_from_hf(hf_dir, dtype=torch.float32, expert_model_parallel_size=2))
    load_hf(model, hf_dir)
    seen = []
    # 1. rank 0 refuses the output before any transfer: every rank raises the refusal at once
    foreign = os.path.join(out_dir, "foreign")
    started = time.monotonic()
    with pytest.raises(ValueError, match="holds files but no checkpoint_manifest"):
        save_hf(model, foreign, fp8=False)
    seen.append(time.monotonic() - started < 20)
    # 2. rank 0's disk fills up in the middle: rank 0 raises its OSError, the others a
    # RuntimeError naming it, once they have sent their pieces; no partial directory is left
    real_write, writes = hf_model.ShardedSafetensorsWriter.write, []

    def full_disk(self, name, tensor):
        writes.append(name)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, tensor)

    if rank == 0:
        hf_model.ShardedSafetensorsWriter.write = full_disk
    target = os.path.join(out_dir, "hf")
    try:
        with pytest.raises((OSError, RuntimeError), match="No space left on device") as failed:
            save_hf(model, target, fp8=False)
    finally:
        hf_model.ShardedSafetensorsWriter.write = real_write
    seen.append(type(failed.value).__name__)
    assert not os.path.exists(target)
    # 3. the ranks are still paired: the next save writes the checkpoint
    save_hf(model, target, fp8=False)
    return seen


def test_a_save_hf_failure_on_rank0_is_raised_on_every_rank(tmp_path, single_rank_world):
    """save_hf gathers the pieces to rank 0 point to point. A refusal on rank 0 (an output that
    is not ours) left the other ranks in send / barrier until rank 0's process ended or the
    group timeout; a failure while writing left them out of step with rank 0."""
    hf_dir = str(tmp_path / "hf")
    make_hf_checkpoint(hf_dir, hidden_size=32, num_attention_heads=2, vocab_size=64,
                       intermediate_size=48)
    out = tmp_path / "out"
    (out / "foreign").mkdir(parents=True)
    (out / "foreign" / "notes.txt").write_text("not a checkpoint")
    seen = run_distributed(_rank_failing_saves, 2, args=(hf_dir, str(out)), timeout=120,
                           megatron_parallel={"expert_model_parallel_size": 2})
    assert [s[0] for s in seen] == [True, True], seen  # (not rank 0's lifetime or a timeout)
    assert [s[1] for s in seen] == ["OSError", "RuntimeError"], seen
    original, exported = tensors(hf_dir), tensors(str(out / "hf"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
