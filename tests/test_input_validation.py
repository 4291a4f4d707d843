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
import torch

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
    ("--fp8-pow2-scales", "--fp8-pow2-scales"),  # without --fp8 nothing is quantised
    ("--dispatch-fp8", "--dispatch-fp8"),        # --ep 1 sends no tokens
    ("--pp 0", "--pp"),                          # 0 is not "unset"
    ("--pp -1", "--pp"),
    ("--pp 2 --micro-batches 3", "--micro-batches"),
    ("--ep 0", "--ep"),
    ("--ep -4", "--ep"),
    ("--ep 3", "--ep"),                          # does not divide the preset's 16 experts
    ("--pp 3 --micro-batches 6", "--pp"),        # 6 DualPipeV stages, 3 layers
    ("--preset deepseek-v4", "--preset"),
]


@pytest.mark.parametrize("argv,flag", TRAIN_BAD)
def test_pretrain_tiny_cli_refuses_bad_values_naming_the_flag(argv, flag, capsys):
    err = refused(capsys, lambda: pretrain_tiny_args(argv.split()), flag)
    # one line: the refusal, not the trainer's 20-line usage above it
    assert err.strip().count("\n") == 0 and "error:" in err and "(see --help)" in err
    assert "usage:" not in err


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


@pytest.mark.parametrize("save_dir", [None, ""])
def test_flags_that_write_into_the_save_dir_are_refused_without_one(save_dir):
    """--save-interval and --trace-step write into --save-dir: without one they did nothing."""
    for kwargs, flag in (({"save_interval": 5}, "--save-interval 5"),
                         ({"trace_step": 2, "pp": 2, "micro_batches": 4}, "--trace-step 2")):
        with pytest.raises(ValueError, match=f"{flag} writes into --save-dir: allowed with a "
                                             "--save-dir only"):
            validate_train_args(TrainArgs(save_dir=save_dir, **kwargs))
    validate_train_args(TrainArgs(save_dir=save_dir))


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


def test_pretrain_tiny_refuses_the_launch_at_parse_time(monkeypatch, capsys, tmp_path):
    """What the launcher and the file system decide is refused when parsed, naming the flag (not
    a traceback from every rank once the process groups exist)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    refused(capsys, lambda: pretrain_tiny_args(["--ep", "2"]), "--ep 2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    err = refused(capsys, lambda: pretrain_tiny_args("--ep 4 --ranks-per-node 3".split()),
                  "--ranks-per-node 3")
    assert "allowed values are [1, 2, 4]" in err
    assert pretrain_tiny_args("--ep 4 --ranks-per-node 2".split()).ranks_per_node == 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for flag in ("--save-dir", "--cache-dir"):
        refused(capsys, lambda: pretrain_tiny_args([flag, str(a_file)]), f"{flag} {a_file}")
    refused(capsys, lambda: pretrain_tiny_args(["--resume", "--overwrite"]), "--overwrite")


def test_pretrain_tiny_refusing_a_run_is_one_error_line(tmp_path, capsys, single_rank_world):
    """A refusal of the run itself (here: its directory already holds one) is `error: ...` and
    exit status 2, not a traceback."""
    from pretrain_tiny import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    code = main(["--save-dir", str(run), "--steps", "1", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: save_dir") and "already holds a run" in err, err
    assert "Traceback" not in err


def test_pretrain_tiny_exits_2_with_one_error_line():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrain_tiny.py"),
                           "--clip-grad", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # (library warnings at import may precede it; the refusal itself is one line, no usage)
    assert "usage:" not in proc.stderr and "(see --help)" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        proc.stderr.strip().splitlines()[-1]]
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
    (SIM + "--chunks 2", "--chunks"),           # zb1p's chunks are fixed: it was ignored
    (SIM + "--plot x.txt", "--plot"),           # no such image format
    (SIM + "--plot /nonexistent/x.png", "--plot"),
    (SIM + "--plot /tmp", "--plot"),            # a directory: it wrote /tmp.png
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


def test_simulate_plot_is_written_where_asked_and_said(tmp_path, capsys):
    from megatron_dsv3.pipeline.simulate import main

    path = tmp_path / "timeline.svg"
    main((SIM + f"--plot {path}").split())
    assert path.stat().st_size > 0
    assert f"wrote {path}" in capsys.readouterr().err


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


@pytest.mark.parametrize("module,argv,flag", [
    ("checkpoint", ["convert", "--to", "dist", "--input", "", "--output", "o"], "--input"),
    ("checkpoint", ["convert", "--to", "dist", "--input", "i", "--output", ""], "--output"),
    ("checkpoint", ["convert", "--to", "hf", "--input", "i", "--output", "o", "--hf-config", ""],
     "--hf-config"),
    ("export", ["--checkpoint", "", "--quant", "fp8", "--out", "o"], "--checkpoint"),
    ("export", ["--checkpoint", "c", "--quant", "fp8", "--out", ""], "--out"),
    ("export", ["--checkpoint", "c", "--quant", "fp8", "--out", "o", "--calib-data", ""],
     "--calib-data"),
    ("generate", ["--checkpoint", "", "--prompt", "x"], "--checkpoint"),
])
def test_empty_paths_are_refused_naming_the_flag(module, argv, flag, capsys):
    """An empty path was read as the current directory: '--input ""' reported that the output
    lies inside the input."""
    import importlib

    main = importlib.import_module({"checkpoint": "megatron_dsv3.checkpoint.__main__",
                                    "export": "megatron_dsv3.export.__main__",
                                    "generate": "megatron_dsv3.generate"}[module]).main
    err = refused(capsys, lambda: main(argv), f"argument {flag}: '' is invalid")
    assert "non-empty paths" in err


def test_export_names_its_own_output_flag(tmp_path):
    from megatron_dsv3.export.api import export

    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=r"lies inside the input .*: choose a --out outside it"):
        export(str(tmp_path / "c"), str(tmp_path / "c" / "o"), "fp8", progress=False)


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


@pytest.mark.parametrize("size", ["--nodes 0", "--gpus-per-node 0", "--tp 0", "--pp 0"])
def test_plan_refuses_a_zero_size_with_a_global_batch_naming_the_flag(size, capsys):
    """With --global-batch-size the micro-batch count was computed before the sizes were
    checked: a ZeroDivisionError traceback instead of the refusal."""
    from megatron_dsv3.plan import main

    argv = f"--nodes 2 --global-batch-size 64 --placement-only {size}".split()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {size} is invalid: allowed values are"), err


# --- python -m megatron_dsv3.pretrain_gpt (our extras and the Megatron flags they read) ---------

def test_pretrain_gpt_help_lists_our_flags():
    """--help shows our flags (Megatron-LM's own --help is printed by a parse inside pretrain()
    that does not know them); without a Megatron-LM checkout it says where the rest is."""
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_LM_PATH"}
    proc = subprocess.run([sys.executable, "-m", "megatron_dsv3.pretrain_gpt", "--help"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT / "docs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--pipeline-schedule", "--dsv3-fp8-recipe", "--dsv3-dispatcher",
                 "--dsv3-dispatch-chunks", "--dsv3-dispatch-fp8", "--ranks-per-node"):
        assert flag in proc.stdout, flag
    assert "python -m megatron_dsv3.pretrain_gpt" in proc.stdout


def test_simulate_help_names_the_module_command(capsys):
    from megatron_dsv3.pipeline.simulate import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m megatron_dsv3.pipeline.simulate")
    assert "--microbatches 16 \\\n" in out  # (the docstring's line continuation is kept)


@pytest.mark.parametrize("argv,flag", [
    ("--dsv3-dispatch-chunks -1", "--dsv3-dispatch-chunks"),
    ("--ranks-per-node 0", "--ranks-per-node"),
    ("--ranks-per-node -8", "--ranks-per-node"),
    ("--pipeline-model-parallel-size 0", "--pipeline-model-parallel-size"),
    ("--num-virtual-stages-per-pipeline-rank 0", "--num-virtual-stages-per-pipeline-rank"),
    ("--expert-tensor-parallel-size 0", "--expert-tensor-parallel-size"),
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


# --- the model config: every number refused at configuration time, naming the field -------------

NAN, INF = float("nan"), float("inf")

CONFIG_BAD = [
    # parallel sizes (were a ZeroDivisionError, or accepted: ep=-2 built and ran)
    (dict(tensor_model_parallel_size=0), "tensor_model_parallel_size"),
    (dict(tensor_model_parallel_size=-1), "tensor_model_parallel_size"),
    (dict(expert_model_parallel_size=0), "expert_model_parallel_size"),
    (dict(expert_model_parallel_size=-2), "expert_model_parallel_size"),
    (dict(pipeline_model_parallel_size=0), "pipeline_model_parallel_size"),
    # sizes tensor parallelism splits (were a size error when the layer was built), and the
    # expert tensor parallelism Megatron gives an unset one (was refused when the layer was built)
    (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1, ffn_hidden_size=161),
     "ffn_hidden_size"),
    (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1,
          moe_shared_expert_intermediate_size=33), "moe_shared_expert_intermediate_size"),
    (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1, vocab_size=255),
     "vocab_size"),
    (dict(tensor_model_parallel_size=2), "expert_tensor_parallel_size"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(max_position_embeddings=-5), "max_position_embeddings"),
    (dict(max_position_embeddings=None), "max_position_embeddings"),
    # numbers of the layers
    (dict(layernorm_epsilon=-1.0), "layernorm_epsilon"),
    (dict(layernorm_epsilon=0.0), "layernorm_epsilon"),
    (dict(layernorm_epsilon=NAN), "layernorm_epsilon"),
    (dict(dsv3_latent_norm_epsilon=0.0), "dsv3_latent_norm_epsilon"),
    (dict(dsv3_latent_norm_epsilon=INF), "dsv3_latent_norm_epsilon"),
    (dict(init_method_std=-0.02), "init_method_std"),
    (dict(init_method_std=INF), "init_method_std"),
    (dict(hidden_dropout=1.5), "hidden_dropout"),
    (dict(hidden_dropout=-0.1), "hidden_dropout"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(attention_dropout=1.5), "attention_dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(attention_dropout=True), "attention_dropout"),
    # RoPE / YaRN
    (dict(rotary_base=0), "rotary_base"),
    (dict(rotary_base=-1), "rotary_base"),
    (dict(rotary_base=1), "rotary_base"),          # log(base) = 0 in YaRN's ramp
    (dict(rope_type="rope", rotary_base=0), "rotary_base"),
    (dict(rotary_scaling_factor=0), "rotary_scaling_factor"),
    (dict(rotary_scaling_factor=-4), "rotary_scaling_factor"),
    (dict(rotary_scaling_factor=0.5), "rotary_scaling_factor"),
    (dict(rotary_scaling_factor=NAN), "rotary_scaling_factor"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
    (dict(original_max_position_embeddings=64.5), "original_max_position_embeddings"),
    (dict(beta_fast=1, beta_slow=32), "beta_fast"),  # the ramp inverted
    (dict(beta_fast=8, beta_slow=8), "beta_fast"),
    (dict(beta_slow=0), "beta_slow"),
    (dict(beta_fast=INF), "beta_fast"),
    (dict(mscale=-1.0), "mscale"),
    (dict(mscale_all_dim=NAN), "mscale_all_dim"),
    # MoE and MTP coefficients
    (dict(moe_router_topk_scaling_factor=0.0), "moe_router_topk_scaling_factor"),  # was 1.0
    (dict(moe_router_topk_scaling_factor=-1.0), "moe_router_topk_scaling_factor"),
    (dict(moe_router_topk_scaling_factor=NAN), "moe_router_topk_scaling_factor"),
    (dict(moe_router_bias_update_rate=NAN), "moe_router_bias_update_rate"),
    (dict(moe_router_bias_update_rate=INF), "moe_router_bias_update_rate"),
    (dict(moe_router_bias_update_rate=None), "moe_router_bias_update_rate"),
    (dict(moe_aux_loss_coeff=NAN), "moe_aux_loss_coeff"),  # was: balancing silently off
    (dict(moe_aux_loss_coeff=INF), "moe_aux_loss_coeff"),
    (dict(moe_aux_loss_coeff=-1e-4), "moe_aux_loss_coeff"),
    (dict(moe_aux_loss_coeff=True), "moe_aux_loss_coeff"),
    (dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
          moe_aux_loss_coeff=[1e-3, NAN]), "moe_aux_loss_coeff"),
    (dict(moe_z_loss_coeff=NAN), "moe_z_loss_coeff"),
    (dict(moe_z_loss_coeff=INF), "moe_z_loss_coeff"),
    (dict(moe_input_jitter_eps=NAN), "moe_input_jitter_eps"),
    (dict(moe_input_jitter_eps=INF), "moe_input_jitter_eps"),
    (dict(mtp_loss_scaling_factor=NAN), "mtp_loss_scaling_factor"),
    (dict(mtp_loss_scaling_factor=-1.0), "mtp_loss_scaling_factor"),  # gradient ascent on MTP
    (dict(mtp_loss_scaling_factor=None), "mtp_loss_scaling_factor"),  # with mtp_num_layers=1
]


@pytest.mark.parametrize("overrides,field", CONFIG_BAD,
                         ids=[f"{f}-{i}" for i, (_, f) in enumerate(CONFIG_BAD)])
def test_config_refuses_bad_numbers_naming_the_field(overrides, field):
    from megatron_dsv3.configs import get_config

    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: allowed values are") as e:
        get_config("deepseek-v3-tiny", **overrides)
    assert "allowed" in str(e.value)


def test_config_accepts_the_edges_of_the_ranges():
    from megatron_dsv3.configs import get_config

    for overrides in (dict(init_method_std=0.0), dict(hidden_dropout=0.0, attention_dropout=0.99),
                      dict(rotary_scaling_factor=1), dict(mscale=0.0, mscale_all_dim=0.0),
                      dict(beta_fast=2, beta_slow=1.5), dict(moe_router_topk_scaling_factor=None),
                      dict(moe_router_bias_update_rate=0.0), dict(moe_aux_loss_coeff=0.0),
                      dict(moe_z_loss_coeff=0.0), dict(mtp_loss_scaling_factor=0.0),
                      dict(mtp_num_layers=None, mtp_loss_scaling_factor=None),
                      dict(rope_type="rope", rotary_scaling_factor=0.5, beta_fast=1, beta_slow=32)):
        get_config("deepseek-v3-tiny", **overrides)


def test_router_scaling_none_is_one_and_zero_never_reaches_it(tiny_config):
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.moe.router import SigmoidGroupRouter

    router = SigmoidGroupRouter(get_config("deepseek-v3-tiny", moe_router_topk_scaling_factor=None))
    assert router.scaling_factor == 1.0
    assert SigmoidGroupRouter(tiny_config).scaling_factor == 2.5


# --- Megatron fields our layers build one way only (RMSNorm, no biases, SwiGLU) ------------------

LAYER_CHOICES = [
    (dict(normalization="LayerNorm"), "normalization", "--normalization RMSNorm"),
    (dict(normalization="Foo"), "normalization", "--normalization RMSNorm"),
    (dict(add_bias_linear=True), "add_bias_linear", "--disable-bias-linear"),
    (dict(gated_linear_unit=False), "gated_linear_unit", "--swiglu"),
    (dict(activation_func=torch.nn.functional.gelu), "activation_func", "--swiglu"),
    (dict(activation_func=torch.nn.SiLU()), "activation_func", "--swiglu"),
]


@pytest.mark.parametrize("overrides,field,flag", LAYER_CHOICES,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(LAYER_CHOICES)])
def test_layer_choices_we_do_not_build_are_refused(overrides, field, flag):
    from megatron_dsv3.configs import get_config

    with pytest.raises(ValueError, match=field) as e:
        get_config("deepseek-v3-tiny", **overrides)
    assert "is not supported by megatron-dsv3" in str(e.value) and flag in str(e.value)


def test_megatron_lm_defaults_for_the_layers_are_refused_on_its_config():
    """Megatron-LM's defaults (biases, GeLU) reach validate_config on the pretrain_gpt path."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_dsv3.configs import validate_config

    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, kv_lora_rank=16,
              q_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8,
              normalization="RMSNorm")
    with pytest.raises(ValueError, match="add_bias_linear=True .*--disable-bias-linear"):
        validate_config(MLATransformerConfig(**kw))
    with pytest.raises(ValueError, match="gated_linear_unit=False .*--swiglu"):
        validate_config(MLATransformerConfig(add_bias_linear=False, **kw))
    validate_config(MLATransformerConfig(add_bias_linear=False, gated_linear_unit=True,
                                         activation_func=torch.nn.functional.silu, **kw))


def test_presets_still_build_with_deepseeks_layer_choices(single_rank_world):
    from megatron_dsv3.configs import PRESETS, get_config
    from megatron_dsv3.model import build_model

    for name in PRESETS:
        config = get_config(name)
        assert (config.normalization, config.add_bias_linear, config.gated_linear_unit,
                config.activation_func) == ("RMSNorm", False, True, torch.nn.functional.silu)
    config = get_config("deepseek-v3-tiny", qk_layernorm=False)  # not refused: MLA norms anyway
    model = build_model(config)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert any("q_layernorm" in n for n, _ in model.named_parameters())


# --- model chunks and pipeline schedules --------------------------------------------------------

@pytest.mark.parametrize("schedule,pp_rank,pp_size,field", [
    ("dualpipev", 2, 2, "pp_rank"),       # was: stages 2 and 1 built, neither first nor last
    ("dualpipev", -1, 2, "pp_rank"),      # was an IndexError
    ("dualpipev", 1.0, 2, "pp_rank"),
    ("dualpipev", 0, 0, "pp_size"),
    ("dualpipev", 0, -2, "pp_size"),
    ("dualpipe", 0, 3, "pp_size"),        # DualPipe needs an even P (was refused at run time)
])
def test_build_model_chunks_refuses_bad_ranks(schedule, pp_rank, pp_size, field):
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model_chunks import build_model_chunks

    config = get_config("deepseek-v3-tiny", mtp_num_layers=None)
    with pytest.raises(ValueError, match=rf"{field}=.*invalid.*allowed values are"):
        build_model_chunks(config, schedule, pp_rank, pp_size)


@pytest.mark.parametrize("chunks", [0, -1, 1.5, True])
def test_schedules_refuse_chunks_below_one(chunks):
    from megatron_dsv3.pipeline import schedules

    with pytest.raises(ValueError, match=r"chunks=.* is invalid: allowed values are integers >= 1"):
        schedules.build("interleaved", 2, 4, chunks=chunks)
    with pytest.raises(ValueError, match="chunks="):
        schedules.check_ranks("interleaved", 2, chunks)


def test_schedules_refuse_bad_rank_and_micro_batch_counts():
    from megatron_dsv3.pipeline import schedules

    with pytest.raises(ValueError, match="pipeline ranks=0 is invalid"):
        schedules.build("1f1b", 0, 4)
    with pytest.raises(ValueError, match="micro-batches=0 is invalid"):
        schedules.build("1f1b", 2, 0)
    assert len(schedules.build("interleaved", 2, 4, chunks=1)) == 2


# --- inference: the engine, its requests and their sampling parameters --------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(block_size=0), "block_size"),            # was a ZeroDivisionError
    (dict(block_size=-4), "block_size"),
    (dict(block_size=2.5, num_blocks=64), "block_size"),
    (dict(max_batch_size=0), "max_batch_size"),    # named the wrong fields
    (dict(max_batch_size=0, num_blocks=64), "max_batch_size"),  # generate() never returned
    (dict(max_batch_size=-1, num_blocks=64), "max_batch_size"),
    (dict(num_blocks=0), "num_blocks"),
])
def test_engine_refuses_bad_sizes_at_construction(kwargs, field):
    from megatron_dsv3.inference import InferenceEngine

    # refused before the model is looked at
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: allowed values are integers"):
        InferenceEngine(object(), **kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=NAN), "temperature"),        # was: a RuntimeError in multinomial
    (dict(temperature=INF), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature="0.5"), "temperature"),
    (dict(top_k=2.5), "top_k"),                    # was: a TypeError in topk
    (dict(top_k=-1), "top_k"),
    (dict(top_p=NAN), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(logprobs=1.5), "logprobs"),
    (dict(seed=2**64), "seed"),                    # was: an OverflowError at generation
    (dict(seed=2**70), "seed"),
    (dict(seed=-1), "seed"),                       # torch maps it to 2**64 - 1
    (dict(seed=1.0), "seed"),
])
def test_sampling_params_refuse_bad_values_at_construction(kwargs, field):
    from megatron_dsv3.inference import SamplingParams

    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: allowed values are"):
        SamplingParams(**kwargs)


def test_sampling_params_accept_their_bounds():
    from megatron_dsv3.inference import SamplingParams

    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, seed=0, logprobs=0)
    SamplingParams(temperature=1.5, top_k=5, top_p=0.5, seed=2**64 - 1, logprobs=3)


@pytest.fixture(scope="module")
def tiny_engine(single_rank_world):
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.inference import InferenceEngine
    from megatron_dsv3.model import build_model

    return InferenceEngine(build_model(get_config("deepseek-v3-tiny")), num_blocks=64)


@pytest.mark.parametrize("prompt,kwargs,match", [
    ([1, 256, 3], {}, r"prompt token 256 at position 1 is invalid: allowed token ids are "
                      r"integers in \[0, 255\]"),     # was an IndexError in the embedding
    ([1, -1, 3], {}, r"prompt token -1 at position 1 .*\[0, 255\]"),
    ([1, 2.0], {}, r"prompt token 2.0 at position 1"),
    ([True, 2], {}, r"prompt token True at position 0"),
    ([1, 2], dict(max_new_tokens=2.5), r"max_new_tokens=2.5 is invalid"),  # was: 3 tokens
    ([1, 2], dict(max_new_tokens=0), r"max_new_tokens=0 is invalid"),
    ([1, 2], dict(arrival=INF), r"arrival=inf is invalid"),  # was an OverflowError
    ([1, 2], dict(arrival=NAN), r"arrival=nan is invalid"),
])
def test_engine_refuses_bad_requests_before_any_forward(tiny_engine, prompt, kwargs, match):
    from megatron_dsv3.inference import Request

    with pytest.raises(ValueError, match=rf"request 0: {match}"):
        tiny_engine.generate([Request(prompt, **kwargs)])
    assert tiny_engine.cache.num_free_blocks == 64  # nothing was admitted


def test_per_token_loss_is_refused_by_the_trainer_naming_the_field():
    """The trainer averages each micro-batch's LM loss over its tokens and runs no
    finalize_model_grads: with calculate_per_token_loss the model's MTP and balancing losses
    would stay sums over tokens (the MTP gradient x the step's token count, measured)."""
    for pp in (1, 2):
        with pytest.raises(ValueError, match=r"calculate_per_token_loss=True \(TrainArgs"
                                             r"\.config_overrides\) is refused .* allowed: False"):
            validate_train_args(TrainArgs(pp=pp, micro_batches=4,
                                          config_overrides={"calculate_per_token_loss": True}))
    validate_train_args(TrainArgs(config_overrides={"calculate_per_token_loss": False}))


def test_overlap_pairs_with_a_recompute_that_reruns_random_draws_is_refused_at_start():
    """The executor refuses it at the first step; the trainer names it before any rank starts."""
    noisy = {"hidden_dropout": 0.1, "recompute_granularity": "selective",
             "recompute_modules": ["mlp"]}
    with pytest.raises(ValueError, match=r"--overlap-pairs is refused with recompute_modules "
                                         r"\['mlp'\] and hidden_dropout=0.1"):
        validate_train_args(TrainArgs(pp=2, micro_batches=4, overlap_pairs=True,
                                      config_overrides=noisy))
    # --recompute's own modules draw nothing: allowed
    validate_train_args(TrainArgs(pp=2, micro_batches=4, overlap_pairs=True, recompute=True,
                                  config_overrides=noisy))
