"""`python -m megatron_dsv3.generate` on a trainer checkpoint (byte-level), on an HF checkpoint
with its own tokenizer and on one without (prompts as token ids), against in-process generation and
transformers' own greedy decoding. The references run in float32, so these runs pass --dtype fp32
(the default is bf16)."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "checkpoint"))
from hf_checkpoints import add_mtp_layers, make_hf_checkpoint  # noqa: E402

from megatron_dsv3.configs import get_config  # noqa: E402
from megatron_dsv3.generate import main  # noqa: E402
from megatron_dsv3.inference import InferenceEngine, Request  # noqa: E402
from megatron_dsv3.model import build_model  # noqa: E402
from megatron_dsv3.tokenizer import ByteTokenizer  # noqa: E402
from megatron_dsv3.training.trainer import TrainArgs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHARS = "abcdefghijklmnopqrstuvwxyz .,;:()=_0123456789ABCDEFGHIJKLMNOPQRS"


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory, single_rank_world):
    """A run directory as Trainer.save leaves it: <run>/checkpoint/rank0.pt with the model state,
    the TrainArgs (preset, seed, overrides) and the world size."""
    run = tmp_path_factory.mktemp("run")
    args = TrainArgs(seed=7, save_dir=str(run), config_overrides={"init_method_std": 0.2})
    model = build_model(get_config(args.preset, init_seed=7, init_method_std=0.2))
    os.makedirs(run / "checkpoint")
    torch.save({"models": [model.state_dict()], "optimizer": {}, "step": 3,
                "rng": torch.get_rng_state(), "args": dataclasses.asdict(args), "world_size": 1},
               run / "checkpoint" / "rank0.pt")
    return str(run), model.eval()


def run_cli(*argv):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megatron_dsv3.generate", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_generates_from_a_trainer_checkpoint_in_a_subprocess(trainer_run):
    run, model = trainer_run
    prompts = ["def main(", "import os"]
    tok = ByteTokenizer()
    expected = InferenceEngine(model, block_size=16, decode=tok.detokenize).generate(
        [Request(tok.tokenize(p), 12, stop_token_ids=[0]) for p in prompts])
    out = run_cli("--checkpoint", run, "--prompt", prompts[0], "--prompt", prompts[1],
                  "--max-new-tokens", "12", "--speculative", "--device", "cpu", "--dtype", "fp32")
    assert out.returncode == 0, out.stderr
    for i, (p, e) in enumerate(zip(prompts, expected)):
        assert f"=== request {i} ({len(e.tokens)} tokens, {e.finish_reason}) ===\n{p}{e.text}\n" \
            in out.stdout
    assert "MTP acceptance" in out.stderr and "tokens per main-model forward" in out.stderr


def test_cli_streams_and_samples_reproducibly(trainer_run, capsys):
    run, _ = trainer_run
    argv = ["--checkpoint", os.path.join(run, "checkpoint"), "--prompt", "x = ",
            "--max-new-tokens", "10", "--temperature", "0.9", "--top-k", "5", "--seed", "3",
            "--stream", "--ignore-eos"]
    outputs = []
    for _ in range(2):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("x = ")


def test_cli_reports_bad_checkpoints_without_a_traceback(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "rank0.pt").write_bytes(b"not a checkpoint")
    distributed = tmp_path / "distributed"
    (distributed / "checkpoint").mkdir(parents=True)
    torch.save({"models": [{}], "args": dataclasses.asdict(TrainArgs(pp=2)), "world_size": 8},
               distributed / "checkpoint" / "rank0.pt")
    cases = [(str(tmp_path / "missing"), "does not exist"),
             (str(empty), "neither an HF checkpoint"),
             (str(broken), "not a readable trainer checkpoint"),
             (str(distributed), "written by a distributed run")]
    for path, message in cases:
        assert main(["--checkpoint", path, "--prompt", "a"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


def char_tokenizer(path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(path)


def test_cli_on_an_hf_checkpoint_with_its_tokenizer_matches_transformers_greedy(tmp_path, capsys):
    path = str(tmp_path / "hf")
    hf_model = make_hf_checkpoint(path, rope_interleave=False, vocab_size=64)
    add_mtp_layers(path, hf_model, depth=1)
    char_tokenizer(path)
    prompt = "def f(x):"
    ids = [CHARS.index(c) + 2 for c in prompt]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ref_text = "".join(CHARS[i - 2] for i in ref if i >= 2)
    for extra in ([], ["--speculative"]):
        code = main(["--checkpoint", path, "--prompt", prompt, "--max-new-tokens", "10",
                     "--ignore-eos", "--device", "cpu", "--dtype", "fp32", *extra])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert f"=== request 0 (10 tokens, length) ===\n{prompt}{ref_text}\n" in out.out
        assert "HF tokenizer" in out.err


def test_cli_on_an_hf_checkpoint_without_a_tokenizer_takes_and_prints_token_ids(tmp_path, capsys):
    path = str(tmp_path / "hf")
    hf_model = make_hf_checkpoint(path, rope_interleave=False, vocab_size=64)
    prompts = [[5, 9, 33, 2], [63, 0]]
    refs = []
    with torch.no_grad():
        for ids in prompts:
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0].tolist()
            refs.append(",".join(map(str, out)))    # prompt ids, then the generated ones
    code = main(["--checkpoint", path, "--prompt-ids", "5,9,33,2", "--prompt-ids", "63, 0",
                 "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32"])
    out = capsys.readouterr()
    assert code == 0, out.err
    for i, ref in enumerate(refs):
        assert f"=== request {i} (6 tokens, length) ===\n{ref}\n" in out.out
    assert "no tokenizer: token ids" in out.err
    # streamed: the prompt's ids, then each new token's, on one line
    assert main(["--checkpoint", path, "--prompt-ids", "5,9,33,2", "--max-new-tokens", "6",
                 "--device", "cpu", "--dtype", "fp32", "--stream"]) == 0
    assert capsys.readouterr().out == refs[0] + "\n"
    # ids outside the vocabulary, and text without a tokenizer, are refused naming what to do
    assert main(["--checkpoint", path, "--prompt-ids", "1,64", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-ids 64 is invalid: allowed values are integers in [0, 63]" in err
    assert main(["--checkpoint", path, "--prompt", "abc", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--prompt needs a tokenizer" in err and "--prompt-ids" in err


def test_cli_sizes_its_cache_for_one_long_prompt(tmp_path, capsys):
    """The engine's default cache holds max_batch_size requests of up to 4096 positions; the CLI
    runs all its requests at once and sizes the cache for them, so one prompt longer than that
    (the model allows it) runs instead of asking for a num_blocks the CLI has no flag for."""
    path = str(tmp_path / "hf")
    make_hf_checkpoint(path, vocab_size=64, max_position_embeddings=8192)
    prompt = ",".join(str(i % 64) for i in range(4200))
    assert main(["--checkpoint", path, "--prompt-ids", prompt, "--max-new-tokens", "2",
                 "--device", "cpu", "--dtype", "fp32", "--block-size", "64"]) == 0, \
        capsys.readouterr().err
    assert "=== request 0 (2 tokens, length) ===" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--prompt-ids", "1,,2"], "1,,2 is invalid: allowed values are comma-separated integers"),
    (["--prompt-ids", "1,-2"], "-2 is invalid: allowed values are integers >= 0"),
    (["--prompt-ids", "1,x"], "x is invalid: allowed values are integers >= 0"),
    ([], "a prompt is needed"),
])
def test_cli_refuses_malformed_prompt_ids_when_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "/nonexistent", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_one_default_dtype_bf16_for_the_cli_and_every_load_path(trainer_run, tmp_path):
    from megatron_dsv3.checkpoint.hf_config import DEFAULT_DTYPE, config_from_hf
    from megatron_dsv3.generate import DTYPES, build_parser
    from megatron_dsv3.inference.loading import load_for_generation

    args = build_parser().parse_args(["--checkpoint", "c", "--prompt", "x"])
    assert getattr(torch, DTYPES[args.dtype]) == DEFAULT_DTYPE == torch.bfloat16
    run, _ = trainer_run                      # trained in float32 (TrainArgs.bf16 is False)
    model, _ = load_for_generation(run)
    assert model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    path = str(tmp_path / "hf")
    make_hf_checkpoint(path, vocab_size=64)   # stored in float32
    assert config_from_hf(path).params_dtype == torch.bfloat16
    model, tok = load_for_generation(path)
    assert model.embedding.word_embeddings.weight.dtype == torch.bfloat16 and tok is None


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "a", "--stop", ""], "--stop '' is invalid: allowed are non-empty strings"),
    (["--prompt", "a", "--top-k", "5"], "--top-k applies to sampling: allowed with --temperature"),
    (["--prompt", "a", "--top-p", "0.5", "--seed", "3"], "--top-p --seed apply to sampling"),
    (["--prompt", "a", "--device", "gpu0"], "--device 'gpu0' is invalid"),
])
def test_cli_refuses_flags_that_would_be_ignored_or_fail_late(argv, message, capsys):
    """Before: an empty stop string ended every request after one token; sampling flags under
    greedy decoding changed nothing; a bad device failed with a traceback after loading."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "/nonexistent", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("release", [False, True])
def test_cli_generates_from_a_converted_distributed_checkpoint(tmp_path, capsys, release):
    """`convert --to dist` output (ours, or in Megatron-LM's layout) gives the HF checkpoint's
    tokens (it was refused as neither an HF nor a trainer checkpoint)."""
    from megatron_dsv3.checkpoint.convert import hf_to_dist

    hf, dist = str(tmp_path / "hf"), str(tmp_path / "dist")
    make_hf_checkpoint(hf, vocab_size=64)
    hf_to_dist(hf, dist, dtype=torch.float32, progress=False, megatron_release=release)
    outs = []
    for path in (hf, dist):
        assert main(["--checkpoint", path, "--prompt-ids", "5,9,33,2", "--max-new-tokens", "5",
                     "--device", "cpu", "--dtype", "fp32"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "(5 tokens, length)" in outs[0]


def test_byte_tokenizer_refuses_the_character_whose_byte_ends_a_document():
    """U+0000 encodes to byte 0, the end-of-document id: 'a\\x00b' became [97, EOD, 98] and
    decoded back as 'ab' (found by review)."""
    tok = ByteTokenizer()
    assert tok.detokenize(tok.tokenize("héllo")) == "héllo"
    with pytest.raises(ValueError, match="U\\+0000 at position 1"):
        tok.tokenize("a\x00b")


def test_a_data_parallel_runs_checkpoint_loads(trainer_run, tmp_path, capsys):
    """Data parallelism alone (world size 2, pp=1, ep=1): rank 0's file holds the whole model
    (it was refused as "written by a distributed run")."""
    run, _ = trainer_run
    state = torch.load(os.path.join(run, "checkpoint", "rank0.pt"), weights_only=False)
    os.makedirs(tmp_path / "checkpoint")
    torch.save(dict(state, world_size=2), tmp_path / "checkpoint" / "rank0.pt")
    outs = []
    for path in (run, str(tmp_path)):
        assert main(["--checkpoint", path, "--prompt", "def ", "--max-new-tokens", "4",
                     "--device", "cpu", "--dtype", "fp32"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_cli_refuses_a_prompt_that_is_not_utf8_and_a_block_larger_than_any_request(
        trainer_run, capsys):
    """Bytes the shell passes that are not UTF-8 (Python holds them as surrogates) crashed in the
    tokenizer (a TypeError traceback from an HF tokenizer); a --block-size above
    max_position_embeddings asked for a cache of block-size positions per request and failed
    allocating it after the model had loaded, and so did a --max-new-tokens beyond it."""
    from megatron_dsv3.inference import InferenceEngine
    from megatron_dsv3.inference.loading import load_for_generation

    run, _ = trainer_run
    checkpoint = os.path.join(run, "checkpoint")
    for argv, message in (
            (["--prompt", b"ab\xffc".decode("utf-8", "surrogateescape")],
             "is invalid: allowed is UTF-8 text (position 2 is not)"),
            (["--prompt", "x", "--block-size", str(10 ** 9)],
             f"--block-size {10 ** 9} is invalid: allowed values are 1.."),
            # (the cache was sized for 10^13 positions before the request was checked: an
            # allocator error, exit 1, instead of the refusal)
            (["--prompt", "x", "--max-new-tokens", str(10 ** 13)],
             "exceeds the model's max_position_embeddings")):
        assert main(["--checkpoint", checkpoint, "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    model, _ = load_for_generation(checkpoint)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"block_size={limit + 1} is invalid: allowed values are "
                                         f"1..{limit}"):
        InferenceEngine(model, block_size=limit + 1)
    InferenceEngine(model, block_size=limit, num_blocks=1)
