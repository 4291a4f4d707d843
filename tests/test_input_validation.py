"""Every numeric input of our command lines is range-checked when it is parsed: a bad value stops
with the flag's name and the allowed values (argparse: exit code 2 with usage), never with a
library error deep inside, a silent "unset", or a run that does the wrong thing."""

import argparse
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dsv3 import cli
from megatron_dsv3.training.trainer import TrainArgs
from megatron_dsv3.training.validation import RULES, validate_train_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from pretrain_tiny import parse_args as pretrain_tiny_args  # noqa: E402


def refused(capsys, call, flag, code=2):
    """`call` exits with `code` (argparse's error) and stderr names `flag` and what is allowed."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert flag in err and "allowed" in err, err
    return err


# --- the shared range types ----------------------------------------------------------------------

@pytest.mark.parametrize("kind,text", [
    (cli.positive_int, "0"), (cli.positive_int, "-3"), (cli.positive_int, "1.5"),
    (cli.positive_int, "1e3"), (cli.positive_int, ""), (cli.non_negative_int, "-1"),
    (cli.non_negative_float, "-0.1"), (cli.non_negative_float, "nan"),
    (cli.non_negative_float, "inf"), (cli.positive_float, "0"), (cli.probability, "0"),
    (cli.probability, "1.0001"), (cli.seed_int, str(2**32)), (cli.port_int, "65536"),
])
def test_range_types_refuse_out_of_range_and_malformed_numbers(kind, text):
    with pytest.raises(argparse.ArgumentTypeError, match="allowed values are"):
        kind(text)


def test_range_types_accept_their_bounds_and_say_what_is_allowed():
    assert cli.positive_int("1") == 1 and cli.non_negative_int("0") == 0
    assert cli.probability("1") == 1.0 and cli.non_negative_float("0") == 0.0
    assert cli.probability.describe() == "numbers in (0, 1]"
    assert cli.positive_int.describe() == "integers >= 1"
    assert cli.non_negative_float.with_note("0 = off").describe() == "numbers >= 0 (0 = off)"
    with pytest.raises(ValueError, match=r"^--x True is invalid: allowed values are integers"):
        cli.positive_int.check("--x", True)  # a bool is not a count
    with pytest.raises(ValueError, match="--x 2.0 is invalid"):
        cli.positive_int.check("--x", 2.0)


# --- the trainer: examples/pretrain_tiny.py and Trainer(TrainArgs) -------------------------------

TRAIN_BAD = [
    ("--clip-grad -1", "--clip-grad"),           # gradient ascent
    ("--clip-grad nan", "--clip-grad"),
    ("--seq-length 0", "--seq-length"),          # SIGFPE without a message
    ("--seq-length -8", "--seq-length"),
    ("--seq-length 1000", "--seq-length"),       # past the preset's max_position_embeddings=256
    ("--micro-batch-size 0", "--micro-batch-size"),
    ("--micro-batches 0", "--micro-batches"),
    ("--log-interval 0", "--log-interval"),
    ("--steps 0", "--steps"),
    ("--steps -5", "--steps"),
    ("--lr 0", "--lr"),
    ("--lr -0.001", "--lr"),
    ("--lr inf", "--lr"),
    ("--min-lr -0.0001", "--min-lr"),
    ("--lr 1e-3 --min-lr 1e-2", "--min-lr"),     # the "decay" would raise the LR
    ("--warmup-steps -1", "--warmup-steps"),
    ("--weight-decay -0.1", "--weight-decay"),
    ("--seed -1", "--seed"),
    ("--save-interval -10", "--save-interval"),
    ("--keep-checkpoints 0", "--keep-checkpoints"),
    ("--exit-interval -1", "--exit-interval"),
    ("--corpus-bytes 0", "--corpus-bytes"),
    ("--dispatch-chunks 0", "--dispatch-chunks"),
    ("--ranks-per-node -2", "--ranks-per-node"),
    ("--trace-step -1", "--trace-step"),
    ("--pp 2 --micro-batches 8 --steps 10 --trace-step 11", "--trace-step"),  # never reached
    ("--trace-step 3", "--trace-step"),          # DualPipeV only
    ("--overlap-pairs", "--overlap-pairs"),      # DualPipeV only
    ("--pp 0", "--pp"),                          # 0 is not "unset"
    ("--pp -1", "--pp"),
    ("--pp 2 --micro-batches 3", "--micro-batches"),
    ("--ep 0", "--ep"),
    ("--ep -4", "--ep"),
    ("--preset deepseek-v4", "--preset"),
]


@pytest.mark.parametrize("argv,flag", TRAIN_BAD)
def test_pretrain_tiny_cli_refuses_bad_values_naming_the_flag(argv, flag, capsys):
    err = refused(capsys, lambda: pretrain_tiny_args(argv.split()), flag)
    assert "usage:" in err


@pytest.mark.parametrize("argv,flag", TRAIN_BAD)
def test_validate_train_args_names_the_flag(argv, flag):
    tokens = argv.split()
    kwargs = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            name = token[2:].replace("-", "_")
            value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") \
                else True
            default = getattr(TrainArgs, name)
            kwargs[name] = value if isinstance(default, (bool, str)) else type(default)(value)
    with pytest.raises(ValueError, match=f"{flag} .*(allowed|applies)"):
        validate_train_args(TrainArgs(**kwargs))


def test_every_numeric_train_flag_has_a_rule():
    numeric = {f.name for f in dataclasses.fields(TrainArgs)
               if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)}
    assert numeric <= set(RULES), f"no allowed values for {sorted(numeric - set(RULES))}"


def test_train_defaults_and_edge_values_pass():
    validate_train_args(TrainArgs())
    args = pretrain_tiny_args([])
    assert args == TrainArgs()
    validate_train_args(TrainArgs(clip_grad=0.0, seq_length=256, warmup_steps=0, min_lr=0.0,
                                  weight_decay=0.0, pp=2, micro_batches=4, trace_step=300,
                                  overlap_pairs=True, seed=0))
    # the model config may raise the limit
    validate_train_args(TrainArgs(seq_length=512,
                                  config_overrides={"max_position_embeddings": 512}))


def test_trainer_refuses_before_any_process_group():
    import torch.distributed as dist

    from megatron_dsv3.training.trainer import Trainer

    was_initialized = dist.is_initialized()
    with pytest.raises(ValueError, match="--micro-batch-size 0 is invalid: allowed values are "
                                         "integers >= 1"):
        Trainer(TrainArgs(micro_batch_size=0))
    assert dist.is_initialized() == was_initialized


def test_pretrain_tiny_exits_2_with_usage():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrain_tiny.py"),
                           "--clip-grad", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "usage:" in proc.stderr
    assert "--clip-grad -1.0 is invalid: allowed values are numbers >= 0 (0 = off)" in proc.stderr


# --- python -m megatron_dsv3.generate -----------------------------------------------------------

@pytest.mark.parametrize("argv,flag", [
    ("--block-size 0", "--block-size"),
    ("--block-size -16", "--block-size"),
    ("--max-new-tokens -1", "--max-new-tokens"),
    ("--max-new-tokens 0", "--max-new-tokens"),
    ("--top-k -1", "--top-k"),
    ("--top-p 0", "--top-p"),
    ("--top-p 1.5", "--top-p"),
    ("--top-p -0.2", "--top-p"),
    ("--temperature -0.5", "--temperature"),
    ("--temperature nan", "--temperature"),
    ("--seed -3", "--seed"),
])
def test_generate_refuses_bad_values_naming_the_flag(argv, flag, capsys):
    from megatron_dsv3.generate import main

    refused(capsys, lambda: main(["--checkpoint", "/nonexistent", "--prompt", "x"] + argv.split()),
            flag)


def test_generate_defaults_and_bounds_parse():
    from megatron_dsv3.generate import build_parser

    base = ["--checkpoint", "c", "--prompt", "x"]
    a = build_parser().parse_args(base)
    assert (a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.block_size, a.seed) == \
        (32, 0.0, 0, 1.0, 16, None)
    a = build_parser().parse_args(base + "--top-p 1 --top-k 0 --temperature 0 --seed 0 "
                                         "--max-new-tokens 1 --block-size 1".split())
    assert (a.top_p, a.top_k, a.seed, a.max_new_tokens, a.block_size) == (1.0, 0, 0, 1, 1)


# --- python -m megatron_dsv3.pipeline.simulate --------------------------------------------------

SIM = "--schedule zb1p --pp 2 --microbatches 4 "


@pytest.mark.parametrize("argv,flag", [
    ("--schedule 1f1b --pp 0 --microbatches 4", "--pp"),
    ("--schedule 1f1b --pp -2 --microbatches 4", "--pp"),
    ("--schedule 1f1b --pp 2 --microbatches 0", "--microbatches"),
    ("--schedule 1f1b --pp 2 --microbatches -4", "--microbatches"),
    ("--schedule interleaved --pp 2 --microbatches 4 --chunks 0", "--chunks"),
    (SIM + "--F -1", "--F"),
    (SIM + "--F 0", "--F"),
    (SIM + "--B -2", "--B"),
    (SIM + "--W -1", "--W"),
    (SIM + "--W 3 --B 2", "--W"),    # B - W < 0: a zero-bubble backward would end before it starts
    (SIM + "--FB -2.5", "--FB"),
    (SIM + "--F inf", "--F"),
])
def test_simulate_refuses_bad_values_naming_the_flag(argv, flag, capsys):
    from megatron_dsv3.pipeline.simulate import main

    refused(capsys, lambda: main(argv.split()), flag)


def test_simulate_accepts_edge_times(capsys):
    from megatron_dsv3.pipeline.simulate import main

    main((SIM + "--W 0").split())
    main((SIM + "--W 2 --B 2 --json").split())
    out = capsys.readouterr().out
    assert "total" in out and '"bubble"' in out


# --- python -m megatron_dsv3.checkpoint convert -------------------------------------------------

@pytest.mark.parametrize("argv,flag", [
    ("--to dist --tp 0", "--tp"),       # was read as "unset" (args.tp or 1)
    ("--to dist --pp 0", "--pp"),
    ("--to dist --ep 0", "--ep"),
    ("--to dist --tp -2", "--tp"),
    ("--to hf --max-shard-size 0", "--max-shard-size"),
    ("--to hf --max-shard-size 0KB", "--max-shard-size"),
    ("--to hf --max-shard-size 0.1", "--max-shard-size"),   # rounds to 0 bytes
    ("--to hf --max-shard-size 1.2.3GB", "--max-shard-size"),
])
def test_convert_refuses_zero_and_negative_sizes_naming_the_flag(argv, flag, capsys):
    from megatron_dsv3.checkpoint.__main__ import main

    refused(capsys, lambda: main(["convert", "--input", "a", "--output", "b"] + argv.split()),
            flag)


def test_convert_unset_sizes_stay_none():
    from megatron_dsv3.checkpoint.__main__ import build_parser, parse_size

    a = build_parser().parse_args("convert --to dist --input a --output b".split())
    assert (a.tp, a.pp, a.ep) == (None, None, None)
    a = build_parser().parse_args("convert --to dist --input a --output b --tp 2 --ep 4".split())
    assert (a.tp, a.ep) == (2, 4)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1") == 1 and parse_size(".5KiB") == 512


# --- python -m megatron_dsv3.plan (its non-layout flags) ----------------------------------------

PLAN = "--nodes 256 --pp 16 --ep 64 --schedule dualpipev --placement-only "


@pytest.mark.parametrize("argv,flag", [
    ("--micro-batch-size 0", "--micro-batch-size"),
    ("--micro-batch-size -1", "--micro-batch-size"),
    ("--seq-length 0", "--seq-length"),
    ("--global-batch-size 0", "--global-batch-size"),  # was read as "no global batch"
    ("--global-batch-size -512", "--global-batch-size"),
    ("--gpu-memory-gib 0", "--gpu-memory-gib"),
    ("--gpu-memory-gib -80", "--gpu-memory-gib"),
    ("--num-layers 0", "--num-layers"),
    ("--first-k-dense -1", "--first-k-dense"),
    ("--num-experts 0", "--num-experts"),
    ("--moe-router-topk 0", "--moe-router-topk"),
    ("--moe-router-num-groups 0", "--moe-router-num-groups"),
    ("--moe-router-group-topk -1", "--moe-router-group-topk"),
    ("--mtp -1", "--mtp"),
])
def test_plan_refuses_bad_numbers_naming_the_flag(argv, flag, capsys):
    from megatron_dsv3.plan import main

    refused(capsys, lambda: main((PLAN + argv).split()), flag)


@pytest.mark.parametrize("argv,flag", [
    ("--first-k-dense 100", "--first-k-dense"),        # > num_layers: the config refuses it
    ("--moe-router-group-topk 9", "--moe-router-group-topk"),
    ("--preset deepseek-v4", "--preset"),
])
def test_plan_config_errors_name_the_flag_not_a_traceback(argv, flag, capsys):
    from megatron_dsv3.plan import main

    assert main((PLAN + argv).split()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}") and "allowed" in err, err


# --- python -m megatron_dsv3.pretrain_gpt (our extras and the Megatron flags they read) ---------

@pytest.mark.parametrize("argv,flag", [
    ("--dsv3-dispatch-chunks -1", "--dsv3-dispatch-chunks"),
    ("--ranks-per-node 0", "--ranks-per-node"),
    ("--ranks-per-node -8", "--ranks-per-node"),
    ("--pipeline-model-parallel-size 0", "--pipeline-model-parallel-size"),
    ("--virtual-pipeline-model-parallel-size 0", "--virtual-pipeline-model-parallel-size"),
    ("--num-layers-per-virtual-pipeline-stage 0", "--num-layers-per-virtual-pipeline-stage"),
    ("--mtp-num-layers -1", "--mtp-num-layers"),
])
def test_pretrain_gpt_refuses_bad_values_naming_the_flag(argv, flag, capsys):
    from megatron_dsv3 import pretrain_gpt

    refused(capsys, lambda: pretrain_gpt.parse_dsv3_args(argv.split()), flag)


@pytest.mark.parametrize("attr,flag", [
    ("dsv3_dispatch_chunks", "--dsv3-dispatch-chunks"),
    ("ranks_per_node", "--ranks-per-node"),
    ("pipeline_model_parallel_size", "--pipeline-model-parallel-size"),
])
def test_pretrain_gpt_validation_catches_values_that_skipped_argparse(attr, flag):
    from megatron_dsv3 import pretrain_gpt

    args = argparse.Namespace(pipeline_schedule=None, **{attr: 0})
    with pytest.raises(ValueError, match=f"{flag} 0 is invalid: allowed values are integers >= 1"):
        pretrain_gpt.validate_dsv3_args(args)


# --- examples/slurm/common.sh knobs -------------------------------------------------------------

SLURM_CASES = [
    ("TP", "0"), ("TP", "-1"), ("PP", "x"), ("EP", "1.5"), ("MTP", "-1"), ("SAVE_INTERVAL", "0"),
    ("SAVE_INTERVAL", "abc"), ("DRY_NODES", "0"), ("DRY_GPUS_PER_NODE", "eight"),
    ("MASTER_PORT", "0"), ("MASTER_PORT", "65536"), ("MASTER_PORT", "29 500"),
    ("SLURM_JOB_NUM_NODES", "-2"), ("GPUS_PER_NODE", "0"), ("SLURM_JOB_ID", "1e5"),
    ("VOCAB_SIZE", "0"),
]


def _slurm_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", PYTHON=sys.executable,
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    for k in ("MASTER_PORT", "GPUS_PER_NODE", "VOCAB_SIZE", "SAVE_INTERVAL"):
        if k not in extra:
            env.pop(k, None)
    return env


def test_slurm_knobs_that_are_not_such_integers_stop_with_the_allowed_values(tmp_path):
    """Each case in a subshell of one bash process: dsv3_check_knobs on an otherwise good set."""
    lines = [f'source "{ROOT / "examples" / "slurm" / "common.sh"}"',
             "TP=1 PP=2 EP=8 MTP=1 DRY_NODES=2 DRY_GPUS_PER_NODE=8",
             "(dsv3_check_knobs && echo 'good: ok') 2>&1 || echo 'good: exit' $?"]
    for name, value in SLURM_CASES:
        lines.append(f"({name}='{value}'; dsv3_check_knobs && echo '{name}: ok') 2>&1 "
                     f"|| echo '{name}={value}: exit' $?")
    script = tmp_path / "cases.sh"
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["bash", str(script)], env=_slurm_env(), capture_output=True, text=True,
                         timeout=60).stdout
    assert "good: ok" in out, out
    for name, value in SLURM_CASES:
        assert f"error: {name}={value} is invalid: allowed values are integers" in out, (name, out)
        assert f"{name}={value}: exit 2" in out, (name, out)


def test_slurm_dry_run_stops_on_a_bad_port_before_any_arithmetic(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "smoke_2node.sbatch")],
                          cwd=tmp_path, env=_slurm_env(MASTER_PORT="abc",
                                                       RUN_DIR=str(tmp_path / "run")),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: MASTER_PORT=abc is invalid: allowed values are "
                                   "integers in [1, 65535]")
    assert "node 0" not in proc.stdout


def test_nan_is_never_in_range():
    for kind in (cli.non_negative_float, cli.positive_float, cli.probability, cli.float_range()):
        assert not kind.contains(math.nan) and not kind.contains(math.inf)
