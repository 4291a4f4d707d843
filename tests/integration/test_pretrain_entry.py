"""megatron_dsv3.pretrain_gpt: our extra arguments on a plain parser (always), and through
Megatron-LM's own parse_args + our model_provider on CPU when MEGATRON_LM_PATH names a checkout."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from megatron_dsv3 import pretrain_gpt as entry

MLM = os.environ.get("MEGATRON_LM_PATH")


def _parser():
    return entry.add_dsv3_args(argparse.ArgumentParser(prog="t"))


def test_extra_args_defaults_and_values():
    args = _parser().parse_args([])
    assert (args.pipeline_schedule, args.dsv3_fp8_recipe, args.dsv3_dispatcher,
            args.dsv3_dispatch_chunks, args.dsv3_dispatch_fp8, args.ranks_per_node) == \
        (None, None, "node-aware", 2, False, None)
    args = _parser().parse_args("--pipeline-schedule dualpipev --dsv3-fp8-recipe deepseek-pow2 "
                                "--dsv3-dispatcher flat --dsv3-dispatch-chunks 4 "
                                "--dsv3-dispatch-fp8 --ranks-per-node 8".split())
    assert (args.pipeline_schedule, args.dsv3_fp8_recipe, args.dsv3_dispatcher,
            args.dsv3_dispatch_chunks, args.dsv3_dispatch_fp8, args.ranks_per_node) == \
        ("dualpipev", "deepseek-pow2", "flat", 4, True, 8)


@pytest.mark.parametrize("argv,flag", [
    ("--pipeline-schedule zb", "--pipeline-schedule"),
    ("--dsv3-fp8-recipe blockwise", "--dsv3-fp8-recipe"),
    ("--dsv3-dispatcher flex", "--dsv3-dispatcher"),
    ("--dsv3-dispatch-chunks 0", "--dsv3-dispatch-chunks"),
    ("--ranks-per-node x", "--ranks-per-node"),
])
def test_bad_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv.split())
    assert flag in capsys.readouterr().err


def test_existing_pipeline_schedule_flag_is_kept():
    """A patched Megatron-LM (patches/*/0003) registers --pipeline-schedule itself."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline-schedule", default="1f1b")
    entry.add_dsv3_args(parser)
    assert parser.parse_args([]).pipeline_schedule == "1f1b"


@pytest.mark.parametrize("argv,message", [
    ("--pipeline-schedule dualpipev", "--pipeline-model-parallel-size >= 2"),
    ("--pipeline-schedule dualpipe --pipeline-model-parallel-size 4 --mtp-num-layers 1",
     "dualpipe with --mtp-num-layers"),
    ("--pipeline-schedule dualpipe --pipeline-model-parallel-size 3", "even"),
    # Megatron-LM's virtual-pipeline flags (it has no --virtual-pipeline-model-parallel-size):
    # DualPipe(V) place their chunks themselves, 1f1b runs one chunk, interleaved needs one
    ("--pipeline-schedule dualpipev --pipeline-model-parallel-size 2 "
     "--num-virtual-stages-per-pipeline-rank 2", "--num-virtual-stages-per-pipeline-rank must "
                                                 "not be set"),
    ("--pipeline-schedule dualpipe --pipeline-model-parallel-size 2 "
     "--num-layers-per-virtual-pipeline-stage 1", "--num-layers-per-virtual-pipeline-stage must"),
    ("--pipeline-schedule dualpipev --pipeline-model-parallel-size 2 "
     "--pipeline-model-parallel-layout Et|ttL", "--pipeline-model-parallel-layout must not"),
    ("--pipeline-schedule 1f1b --pipeline-model-parallel-size 2 "
     "--num-virtual-stages-per-pipeline-rank 2", "1f1b runs one model chunk per rank"),
    ("--pipeline-schedule 1f1b --pipeline-model-parallel-size 2 "
     "--num-layers-per-virtual-pipeline-stage 1", "--num-layers-per-virtual-pipeline-stage must"),
    ("--pipeline-schedule interleaved --pipeline-model-parallel-size 2",
     "interleaved needs --num-virtual-stages-per-pipeline-rank"),
    ("--pipeline-schedule interleaved --pipeline-model-parallel-size 2 "
     "--num-virtual-stages-per-pipeline-rank 2 --num-layers-per-virtual-pipeline-stage 1",
     "are both set: allowed is at most one of"),
    ("--tensor-model-parallel-size 2 --num-experts 16",  # Megatron's default: TP's 2
     "the expert tensor-parallel size (2: Megatron's default, --tensor-model-parallel-size 2)"),
    ("--expert-tensor-parallel-size 2 --num-experts 16", "--expert-tensor-parallel-size 2 is "
                                                         "invalid: allowed value 1"),
    ("--dsv3-dispatcher local --dsv3-dispatch-fp8", "--dsv3-dispatch-fp8"),
])
def test_cross_flag_validation(argv, message, capsys):
    with pytest.raises(SystemExit):
        entry.parse_dsv3_args(argv.split() + ["--num-layers", "4"])  # unknown flags pass through
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,world,message", [
    ("--pipeline-schedule dualpipev --pipeline-model-parallel-size 4 --micro-batch-size 1 "
     "--global-batch-size 4", 4, "--global-batch-size 4 / (--micro-batch-size 1 x "
                                 "data-parallel size 1) = 4 micro-batches"),
    ("--pipeline-schedule dualpipe --pipeline-model-parallel-size 2 --micro-batch-size 1 "
     "--global-batch-size 10", 4, "= 5 micro-batches"),  # data-parallel 2: odd per direction
    ("--pipeline-schedule dualpipev --pipeline-model-parallel-size 2 --micro-batch-size 2",
     2, "--global-batch-size 2"),  # Megatron's default global batch: one micro-batch
    ("--pipeline-schedule dualpipev --pipeline-model-parallel-size 2 --micro-batch-size 1 "
     "--global-batch-size 16 --rampup-batch-size 2 2 1000", 2, "--rampup-batch-size"),
])
def test_micro_batch_count_is_checked_against_the_schedule(argv, world, message, capsys):
    """The count the first step would refuse (global batch / (micro-batch x data parallel)) is
    refused at start, naming the flags that set it."""
    with pytest.raises(SystemExit):
        entry.parse_dsv3_args(argv.split() + ["--num-layers", "8"], world_size=world)
    assert message in capsys.readouterr().err
    ok = argv.replace("--global-batch-size 4", "--global-batch-size 8").replace(
        "--global-batch-size 10", "--global-batch-size 8")
    if "rampup" not in ok and ok != argv:
        entry.parse_dsv3_args(ok.split() + ["--num-layers", "8"], world_size=world)


def test_valid_layouts_pass():
    args = entry.parse_dsv3_args("--pipeline-schedule dualpipev --pipeline-model-parallel-size 2 "
                                 "--mtp-num-layers 1 --hidden-size 64".split())
    assert args.pipeline_schedule == "dualpipev"
    # Megatron-LM's virtual-pipeline flags with the interleaved schedule (each was refused or
    # unknown to our check), and TP with the experts' own tensor parallelism 1
    for virtual in ("--num-virtual-stages-per-pipeline-rank 2",
                    "--num-layers-per-virtual-pipeline-stage 1",
                    "--pipeline-model-parallel-layout Et|t|t|tL"):
        entry.parse_dsv3_args(f"--pipeline-schedule interleaved --pipeline-model-parallel-size 2 "
                              f"{virtual} --num-layers 4".split(), world_size=2)
    entry.parse_dsv3_args("--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1 "
                          "--expert-model-parallel-size 16 --num-experts 16 --num-layers 4"
                          .split(), world_size=16)


def test_expert_parallelism_must_fit_with_the_experts_tensor_parallelism(capsys):
    """Megatron's rule, world % (ETP x EP x PP) == 0: EP 16 with TP 2 on 16 ranks passes with
    --expert-tensor-parallel-size 1 (above) and was accepted with Megatron's default ETP = TP,
    which Megatron's initialize_model_parallel then refuses."""
    from megatron_dsv3.configs import layout

    assert layout.check_world_size(16, 2, 1, 16, etp=1) == 8
    with pytest.raises(layout.LayoutError, match=r"16 x the experts' tensor parallelism 2 .* "
                                                 r"allowed values are \[1, 2, 4, 8\]"):
        layout.check_world_size(16, 2, 1, 16, etp=2)


def test_ranks_per_node_sets_topology_env(monkeypatch):
    monkeypatch.delenv("MEGATRON_DSV3_RANKS_PER_NODE", raising=False)
    entry.apply_dsv3_args(argparse.Namespace(ranks_per_node=4, pipeline_schedule=None))
    assert os.environ["MEGATRON_DSV3_RANKS_PER_NODE"] == "4"


def _run(*extra):
    script = os.path.join(os.path.dirname(__file__), "pretrain_entry_check.py")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # this tree, whatever is installed
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, script, MLM, *extra], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not MLM, reason="MEGATRON_LM_PATH not set")
def test_megatron_parse_args_and_model_provider():
    r = _run("--pipeline-schedule", "no_pipelining", "--ranks-per-node", "2",
             "--dsv3-dispatch-chunks", "3")
    assert r["model_class"] == "DeepSeekV3Model"
    assert r["config_class"] == "DeepSeekV3Config"
    assert r["layer_classes"] == ["DeepSeekV3TransformerLayer"]
    assert r["is_moe"] == [False, True, True]
    assert r["dsv3"] == ["node-aware", 3, False, "no_pipelining"]
    assert r["ranks_per_node_env"] == "2"
    assert r["loss_entry"] == r["loss_direct"]
    assert abs(r["loss_entry"] - 5.545) < 0.5  # ~ln(256) at initialisation
    # the training loop's schedule lookup now answers with the named schedule
    assert r["schedule"] == "forward_backward_no_pipelining" and r["schedule_is_mcore"]
    # and that schedule, run with our model, gives the directly computed loss
    assert r["schedule_loss"] == r["loss_direct"]


@pytest.mark.skipif(not MLM, reason="MEGATRON_LM_PATH not set")
def test_megatron_model_provider_with_mtp():
    r = _run("--mtp-num-layers", "1")
    assert r["model_class"] == "DeepSeekV3Model" and r["has_mtp"]
    assert r["loss_entry"] == r["loss_direct"]


