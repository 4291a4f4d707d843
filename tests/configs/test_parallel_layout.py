"""One set of parallel-layout rules (megatron_dsv3.configs.layout): the planner and the converter
give the same verdict on every layout, uneven splits place layers as a hand-written table (and as
Megatron's own functions do for its schedules), DualPipeV chunks with an uneven split load the
converter's distributed checkpoint, and world-size refusals name our flags."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_dsv3 import plan as planner
from megatron_dsv3.checkpoint.convert import check_layout, hf_to_dist
from megatron_dsv3.configs import get_config
from megatron_dsv3.configs import layout
from megatron_dsv3.configs.layout import MEGATRON_FLAGS, LayoutError, check_world_size
from megatron_dsv3.pipeline.placement import StageLayers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "checkpoint"))

from hf_checkpoints import add_mtp_layers, make_hf_checkpoint  # noqa: E402

SLURM_FIRST, SLURM_LAST = 1, 4  # examples/slurm/deepseek_v3_671b.sbatch


@pytest.fixture(scope="module")
def v3():
    return get_config("deepseek-v3", perform_initialization=False, use_cpu_initialization=True)


# (tp, pp, ep, schedule, first, last, vpp, accepted); 256 nodes x 8 GPUs for the planner
LAYOUTS = [
    (1, 16, 64, "dualpipev", SLURM_FIRST, SLURM_LAST, None, True),  # the SLURM file's
    (1, 16, 64, "dualpipev", None, None, None, True),  # our even split over 32 stages
    (1, 16, 64, "1f1b", SLURM_FIRST, SLURM_LAST, None, True),  # Megatron's uneven split
    (1, 16, 64, "1f1b", None, None, None, False),  # 61 % 16: Megatron refuses
    (1, 16, 64, "dualpipev", 1, 3, None, False),  # 57 layers over 14 middle ranks
    (1, 16, 64, "dualpipev", 1, 0, None, False),  # Megatron refuses 0 layers
    (1, 16, 64, "dualpipev", 0, None, None, False),
    (1, 2, 64, "dualpipev", 1, 4, None, False),  # no middle rank: first + last must be 61
    (1, 32, 64, "dualpipev", None, None, None, False),  # 64 stages for 61 layers
    (1, 16, 64, "dualpipe", None, None, None, False),  # DualPipe with MTP
    (1, 16, 64, "dualpipev", 1, 4, 2, False),  # DualPipeV places its chunks itself
    (1, 8, 64, "interleaved", 2, 4, 2, False),  # 55 layers over 6 ranks
    (1, 16, 64, "interleaved", None, None, None, False),  # needs a virtual size
    (1, 16, 48, "dualpipev", 1, 4, None, False),  # 256 experts % 48
    (3, 16, 64, "dualpipev", 1, 4, None, False),  # 128 heads % 3
    (2, 16, 64, "dualpipev", 1, 4, None, True),
]


def _verdict(call):
    try:
        call()
    except LayoutError as e:
        return False, str(e)
    return True, ""


@pytest.mark.parametrize("tp,pp,ep,schedule,first,last,vpp,accepted", LAYOUTS)
def test_planner_and_converter_give_the_same_verdict(v3, tp, pp, ep, schedule, first, last, vpp,
                                                     accepted):
    lay = planner.Layout(256, 8, tp, pp, ep, schedule, first, last, vpp)
    planned, plan_msg = _verdict(lambda: planner.validate(lay, v3, mtp=v3.mtp_num_layers or 0))
    converted, convert_msg = _verdict(lambda: check_layout(v3, tp, pp, ep, schedule=schedule,
                                                           first=first, last=last, vpp=vpp))
    assert planned == converted == accepted, (plan_msg, convert_msg)
    if not accepted:  # each names the setting in its own vocabulary
        assert "--" in plan_msg and "=" in convert_msg
    assert issubclass(planner.PlanError, ValueError) and planner.PlanError is LayoutError


def test_slurm_split_places_one_layer_on_stage_0_none_on_the_last_two_elsewhere():
    table = StageLayers("dualpipev", 16, 61, SLURM_FIRST, SLURM_LAST).table()
    assert table[0] == [[1], []]  # stage 0 (embedding) and stage 31 (final norm, head, MTP)
    assert table[1] == [[2, 3], [60, 61]] and table[15] == [[30, 31], [32, 33]]
    assert all(len(chunk) == 2 for r in range(1, 16) for chunk in table[r])
    lay = planner.Layout(256, 8, 1, 16, 64, "dualpipev", SLURM_FIRST, SLURM_LAST)
    assert planner.placement(lay, 61) == table


@pytest.mark.parametrize("schedule,ranks,layers,first,last,expected", [
    # rank counts [1, 4, 2]: rank r holds stages r and 5-r, the earlier taking the odd layer
    ("dualpipev", 3, 7, 1, 2, {0: [[1], []], 1: [[2, 3], [6, 7]], 2: [[4], [5]]}),
    # rank counts [1, 3, 3, 3] are stage counts; rank r also holds the mirrored stage 3-r
    ("dualpipe", 4, 10, 1, 3, {0: [[1], [8, 9, 10]], 1: [[2, 3, 4], [5, 6, 7]],
                               2: [[5, 6, 7], [2, 3, 4]], 3: [[8, 9, 10], [1]]}),
    ("dualpipev", 2, 5, 1, 4, {0: [[1], []], 1: [[2, 3], [4, 5]]}),
    # first only: rank counts [3, 2, 2]
    ("dualpipev", 3, 7, 3, None, {0: [[1, 2], [7]], 1: [[3], [6]], 2: [[4], [5]]}),
    # unset: today's split, as even as possible with the remainder to the earliest stages
    ("dualpipev", 2, 3, None, None, {0: [[1], []], 1: [[2], [3]]}),
    ("dualpipev", 2, 5, None, None, {0: [[1, 2], [5]], 1: [[3], [4]]}),
])
def test_uneven_split_placement_is_the_hand_written_table(schedule, ranks, layers, first, last,
                                                          expected):
    assert StageLayers(schedule, ranks, layers, first, last).table() == expected
    lay = planner.Layout(1, 8, 1, ranks, 1, schedule, first, last)
    assert planner.placement(lay, layers) == expected


MEGATRON_CASES = [(10, 4, None, 1, 3), (12, 3, 2, 2, 4), (8, 2, 2, None, None),
                  (9, 3, None, 5, None), (9, 3, None, None, 1), (16, 4, None, None, None),
                  (61, 16, None, 1, 4)]


@pytest.mark.parametrize("layers,pp,vpp,first,last", MEGATRON_CASES)
def test_megatron_schedules_place_as_megatrons_own_functions(layers, pp, vpp, first, last):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=2,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               virtual_pipeline_model_parallel_size=vpp,
                               num_layers_in_first_pipeline_stage=first,
                               num_layers_in_last_pipeline_stage=last)
    megatron = {}
    for r in range(pp):
        megatron[r] = []
        for v in range(vpp or 1):
            vp = v if vpp else None
            offset = get_transformer_layer_offset(config, vp, r)
            megatron[r].append(list(range(offset + 1, offset + 1 + get_num_layers_to_build(
                config, vp, r))))
    lay = planner.Layout(1, pp, 1, pp, 1, "interleaved" if vpp else "1f1b", first, last, vpp)
    assert planner.placement(lay, layers) == megatron


@pytest.mark.parametrize("layers,pp,vpp,first,last", [
    (61, 16, None, 1, 0), (61, 16, None, 1, 3), (10, 4, 2, 1, 3), (8, 3, None, None, None),
    (12, 2, None, 5, 5), (12, 3, 2, 2, 5),
])
def test_megatron_and_our_rule_refuse_the_same_splits(layers, pp, vpp, first, last):
    from megatron.core.transformer.transformer_config import TransformerConfig

    schedule = "interleaved" if vpp else "1f1b"
    with pytest.raises(LayoutError):
        layout.stage_layer_counts(layers, schedule, pp, first, last, vpp)
    if first is None and last is None:
        return  # Megatron-LM's validate_args refuses these (an assertion), not the config
    with pytest.raises(ValueError):
        TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=2,
                          pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                          virtual_pipeline_model_parallel_size=vpp,
                          num_layers_in_first_pipeline_stage=first,
                          num_layers_in_last_pipeline_stage=last)


def test_world_size_refusals_name_our_flags():
    with pytest.raises(LayoutError) as e:
        check_world_size(6, pp=2, ep=4)
    msg = str(e.value)
    assert all(w in msg for w in ("--tp 1 x --pp 2 x --ep 4", "does not fit world size 6",
                                  "WORLD_SIZE", "allowed values are [1, 3]")), msg
    with pytest.raises(LayoutError, match=r"--tp 1 x --pp 4 does not fit world size 6 .*allowed "
                                          r"--pp values with --tp 1: \[1, 2, 3, 6\]"):
        check_world_size(6, pp=4)
    with pytest.raises(LayoutError, match="--expert-model-parallel-size 4 does not fit world size"):
        check_world_size(6, 1, 2, 4, names=MEGATRON_FLAGS)
    assert check_world_size(8, pp=2, ep=4) == 4  # DP


def test_trainer_refuses_a_world_that_does_not_fit_before_any_process_group(tmp_path,
                                                                             monkeypatch):
    import torch.distributed as dist

    from megatron_dsv3.training.trainer import TrainArgs, Trainer

    monkeypatch.setenv("WORLD_SIZE", "6")
    initialized = dist.is_initialized()
    with pytest.raises(LayoutError, match=r"--pp 2 x --ep 4 does not fit world size 6"):
        Trainer(TrainArgs(pp=2, ep=4, micro_batches=4, steps=1, save_dir=str(tmp_path / "run")))
    assert dist.is_initialized() == initialized
    # the example trainer has no --tp: its messages name none (not "--tp 1", nor a blank one)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LayoutError) as err:
        Trainer(TrainArgs(pp=2, micro_batches=4, steps=1, save_dir=str(tmp_path / "run")))
    assert str(err.value) == ("--pp 2 does not fit world size 3 (WORLD_SIZE): --pp must divide "
                              "it; allowed --pp values: [1, 3]")


def test_pretrain_entry_checks_our_schedules_split_and_the_world_with_megatrons_flags(capsys):
    from megatron_dsv3 import pretrain_gpt as entry

    base = "--pipeline-schedule dualpipev --pipeline-model-parallel-size 16 --num-layers 61 "
    args = entry.parse_dsv3_args((base + "--decoder-first-pipeline-num-layers 1 "
                                  "--decoder-last-pipeline-num-layers 4").split(), world_size=2048)
    assert (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers) == (1, 4)
    entry.parse_dsv3_args(base.split())  # our even split over 32 stages
    with pytest.raises(SystemExit):
        entry.parse_dsv3_args((base + "--decoder-first-pipeline-num-layers 1 "
                               "--decoder-last-pipeline-num-layers 3").split())
    assert "--decoder-first-pipeline-num-layers 1 and --decoder-last-pipeline-num-layers 3" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        entry.parse_dsv3_args((base + "--expert-model-parallel-size 64").split(), world_size=96)
    assert "--pipeline-model-parallel-size 16 x --expert-model-parallel-size 64 does not fit " \
        "world size 96" in capsys.readouterr().err


# -- the converter on the 671B layout, and a converted checkpoint in uneven DualPipeV chunks ---

def test_converter_cli_accepts_the_slurm_layout_and_refuses_what_megatron_refuses(tmp_path):
    from megatron_dsv3.checkpoint.__main__ import main

    # DeepSeek-V3's depth and an expert count EP64 divides, at toy widths; every layer dense so
    # that the conversion takes seconds (the layout check reads the config only)
    hf_dir = str(tmp_path / "hf")
    make_hf_checkpoint(hf_dir, num_hidden_layers=61, first_k_dense_replace=61, n_routed_experts=64,
                       n_group=8, topk_group=4, hidden_size=16, intermediate_size=16,
                       moe_intermediate_size=8, vocab_size=32, kv_lora_rank=8, q_lora_rank=8,
                       qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
    common = ["convert", "--to", "dist", "--input", hf_dir, "--tp", "1", "--pp", "16", "--ep", "64",
              "--dtype", "fp32", "--quiet"]
    out = str(tmp_path / "dist")
    assert main(common + ["--output", out, "--schedule", "dualpipev",
                          "--decoder-first-pipeline-num-layers", str(SLURM_FIRST),
                          "--decoder-last-pipeline-num-layers", str(SLURM_LAST)]) == 0
    assert os.path.isfile(os.path.join(out, ".metadata"))
    refused = subprocess.run([sys.executable, "-m", "megatron_dsv3.checkpoint"] + common
                             + ["--output", str(tmp_path / "refused")], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1
    assert "--pp 16 does not divide num_layers=61" in refused.stderr  # (the flag as typed)
    assert not os.path.exists(tmp_path / "refused")


def _load_uneven_chunks(rank, world, hf_dir, dist_dir, reference):
    from megatron_dsv3.checkpoint import dist as dist_ckpt
    from megatron_dsv3.checkpoint.hf_model import config_from_hf
    from megatron_dsv3.model_chunks import build_model_chunks

    config = config_from_hf(hf_dir, dtype=torch.float32, pipeline_model_parallel_size=2,
                            num_layers_in_first_pipeline_stage=1,
                            num_layers_in_last_pipeline_stage=4)
    chunks = build_model_chunks(config, "dualpipev", rank, 2)
    dist_ckpt.load(chunks, dist_dir)
    compared = 0
    for chunk in chunks:
        for name, value in chunk.state_dict().items():
            if not isinstance(value, torch.Tensor):
                continue
            if name.startswith("decoder.layers."):
                local = int(name.split(".")[2])
                number = chunk.decoder.layers[local].layer_number
                name = name.replace(f"decoder.layers.{local}.", f"decoder.layers.{number - 1}.", 1)
            assert torch.equal(value, reference[name]), name
            compared += 1
    return [[layer.layer_number for layer in c.decoder.layers] for c in chunks], compared


def test_uneven_dualpipev_chunks_load_the_converted_checkpoint(tmp_path, single_rank_world):
    from megatron_dsv3.checkpoint.hf_model import config_from_hf, load_hf
    from megatron_dsv3.model import build_model
    from megatron_dsv3.testing.distributed import run_distributed

    hf_dir = str(tmp_path / "hf")
    hf = make_hf_checkpoint(hf_dir, num_hidden_layers=5)
    add_mtp_layers(hf_dir, hf, depth=1)
    single = build_model(config_from_hf(hf_dir, dtype=torch.float32))
    load_hf(single, hf_dir)
    reference = {k: v for k, v in single.state_dict().items() if isinstance(v, torch.Tensor)}
    dist_dir = str(tmp_path / "dist")
    hf_to_dist(hf_dir, dist_dir, pp=2, schedule="dualpipev", first=1, last=4,
               dtype=torch.float32, progress=False)
    results = run_distributed(_load_uneven_chunks, 2, args=(hf_dir, dist_dir, reference),
                              megatron_parallel={"pipeline_model_parallel_size": 2}, timeout=240)
    # rank 0: stage 0 (layer 1, embedding) and stage 3 (no layer: final norm, head, MTP)
    assert [placed for placed, _ in results] == [[[1], []], [[2, 3], [4, 5]]]
    assert all(compared > 0 for _, compared in results)


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_PATH"), reason="MEGATRON_LM_PATH not set")
def test_megatron_lm_accepts_the_slurm_split_and_our_chunks_place_it():
    script = os.path.join(HERE, "megatron_split_check.py")
    proc = subprocess.run([sys.executable, script, os.environ["MEGATRON_LM_PATH"]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok"


def test_one_uneven_split_value_is_refused_with_that_flags_allowed_values():
    """Only the first stage's count given: the message lists the values of that flag that leave
    the other ranks equal shares (closed form: 61 - v divisible by pp - 1, at least 1 each)."""
    for pp, first in ((2, 100), (4, 2)):
        with pytest.raises(LayoutError) as err:
            layout.stage_layer_counts(61, "1f1b", pp, first, None, names=layout.FLAGS)
        allowed = [v for v in range(1, 61) if (61 - v) % (pp - 1) == 0]
        shown = (", ".join(map(str, allowed)) if len(allowed) <= 8 else
                 f"{', '.join(map(str, allowed[:6]))}, ..., {allowed[-1]}")
        assert (f"--decoder-first-pipeline-num-layers {first} is invalid with --pp {pp} and "
                f"num_layers=61" in str(err.value))
        assert str(err.value).endswith(f"allowed --decoder-first-pipeline-num-layers values are "
                                       f"{shown}"), str(err.value)
