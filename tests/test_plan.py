"""The planner: parameter totals agree with the model built on the meta device, bad layouts are
refused naming the flag, and per-GPU memory matches a closed-form recomputation."""

import json

import pytest
import torch

from megatron_dsv3 import plan as planner
from megatron_dsv3.configs import get_config


def run(argv):
    args = planner.parser().parse_args(argv)
    return planner.plan(args)


def test_671b_totals_agree_with_the_model_built_on_meta(single_rank_world):
    from megatron_dsv3.model import build_model

    result = run("--preset deepseek-v3 --nodes 256 --gpus-per-node 8 --tp 1 --pp 16 --ep 64 "
                 "--schedule dualpipev --mtp 1 --fp8 --bf16-moments --zero1 "
                 "--global-batch-size 15360".split())
    config = get_config("deepseek-v3", perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        model = build_model(config)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    P = result["parameters"]
    assert P["total_main"] == main and P["mtp"] == mtp
    assert abs(P["total_main"] - 671e9) / 671e9 < 0.005
    assert abs(P["mtp"] - 11.6e9) / 11.6e9 < 0.02
    # activated per token: every weight but the embedding table (a token reads one row of it)
    # and the routed experts it is not sent to; DeepSeek-V3 reports 37B
    routed_main = sum(p.numel() for n, p in model.named_parameters()
                      if ".experts." in n and not n.startswith("mtp."))
    embedding = model.embedding.word_embeddings.weight.numel()
    assert P["activated_main"] == round(main - embedding - routed_main + routed_main * 8 / 256)
    assert 36.5e9 <= P["activated_main"] <= 37.0e9
    # every parameter lands on exactly one pipeline rank (EP shards experts 64 ways), and rank 0
    # holds a second embedding for its MTP chunk (pretrain_gpt unties it for Megatron's DDP)
    per_rank = result["per_rank"]
    assert len(per_rank) == 16
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    rebuilt = sum(r["dense_params_per_gpu"] + r["expert_params_per_gpu"] * 64 for r in per_rank)
    assert abs(rebuilt - (main + mtp + embedding)) <= 16  # rounding per rank
    assert sum(r["expert_params_per_gpu"] for r in per_rank) * 64 == pytest.approx(routed, abs=64)
    L = result["layout"]
    assert (L["world_size"], L["dp"], L["expert_dp"], L["ep_nodes"], L["stages"]) == (
        2048, 128, 2, 8, 32)
    assert result["holders"] == {"embedding": 0, "output_head": 0, "mtp": 0}
    # DualPipeV: in-flight forward activations per rank come from the schedule table
    assert per_rank[0]["in_flight_micro_batches"] == {"0": 32, "1": 1}
    assert result["micro_batches"] == 120 and 0 < result["bubble"]["fraction"] < 0.1
    assert 0 < result["max_memory_gib"] < 141  # an estimate (activations); H200 = 141 GB
    assert result["expert_all_to_all"]["inter_node_copies_per_token_max"] == 4


@pytest.mark.parametrize("argv, words", [
    ("--nodes 3 --gpus-per-node 8 --pp 16", ["--pp 16", "does not divide", "allowed --pp"]),
    ("--nodes 256 --pp 16 --ep 48", ["--ep 48", "allowed values"]),
    ("--nodes 256 --pp 16 --ep 16", ["--ep 16", "node limit M", "--ep >= 32"]),
    ("--nodes 256 --pp 16 --schedule dualpipe --mtp 1", ["--schedule dualpipe", "--mtp"]),
    ("--nodes 256 --pp 32 --ep 64 --schedule dualpipev --mtp 1", ["--pp 32", "64 stages",
                                                                    "--pp <= 31"]),
    ("--nodes 256 --pp 16 --ep 64 --schedule zigzag", ["--schedule 'zigzag'", "dualpipev"]),
    # (no --pp fits: the message suggested --pp <= 1, which DualPipeV refuses in turn)
    ("--nodes 1 --gpus-per-node 4 --pp 4 --schedule dualpipev --num-layers 2",
     ["--pp 4", "8 stages", "the model has 2 layers", "no --pp (the smallest, 2, needs 3 layers)"]),
    ("--nodes 256 --pp 16 --ep 64 --schedule dualpipev --global-batch-size 1024",
     ["micro-batches", "DualPipeV needs micro-batches >= 2 x ranks = 32"]),
    # 16 nodes for 8 routing groups: a token's 4 groups could land on 8 nodes (the dispatcher
    # refuses it too)
    ("--nodes 512 --gpus-per-node 4 --pp 16 --ep 64",
     ["--ep 64 spans 16 nodes", "moe_router_num_groups=8", "one of [16, 32]"]),
])
def test_bad_layouts_are_refused_naming_the_flag(argv, words, capsys):
    code = planner.main(("--placement-only --preset deepseek-v3 " + argv).split())
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    for w in words:
        assert w in err, err


def test_placement_only_json_is_the_v_placement(capsys):
    from megatron_dsv3.pipeline.placement import StageLayers

    assert planner.main("--nodes 256 --pp 16 --ep 64 --schedule dualpipev --placement-only "
                        "--json".split()) == 0
    out = json.loads(capsys.readouterr().out)
    assert {int(r): c for r, c in out["placement"].items()} == StageLayers("dualpipev", 16, 61).table()
    assert "parameters" not in out


def test_tiny_memory_matches_a_closed_form_recomputation(single_rank_world):
    """deepseek-v3-tiny, 1 node x 8, TP1 PP2 EP4 DualPipeV, ZeRO-1, BF16 moments, FP8 copy."""
    from megatron_dsv3.model import build_model

    result = run("--preset deepseek-v3-tiny --nodes 1 --gpus-per-node 8 --pp 2 --ep 4 "
                 "--schedule dualpipev --mtp 1 --fp8 --bf16-moments --zero1 "
                 "--micro-batch-size 2 --seq-length 64 --global-batch-size 32 "
                 "--recompute none --json".split())
    config = get_config("deepseek-v3-tiny", perform_initialization=False)
    with torch.device("meta"):
        model = build_model(config)
    params = dict((n, p.numel()) for n, p in model.named_parameters())
    # V placement of 3 layers over 4 stages: rank 0 holds layer 1 and stage 3 (empty + head + MTP),
    # rank 1 holds layers 2 and 3
    assert result["placement"] == {"0": [[1], []], "1": [[2], [3]]}

    def layer(i, routed):
        return sum(v for n, v in params.items() if n.startswith(f"decoder.layers.{i - 1}.")
                   and (".experts." in n) == routed)

    rank0_dense = (layer(1, False) + 2 * params["embedding.word_embeddings.weight"]  # MTP's copy
                   + params["output_layer.weight"] + params["decoder.final_layernorm.weight"]
                   + sum(v for n, v in params.items() if n.startswith("mtp.") and ".experts." not in n))
    rank0_exp = layer(1, True) + sum(v for n, v in params.items()
                                     if n.startswith("mtp.") and ".experts." in n)
    dp, ep, edp = 4, 4, 1  # world 8 / PP 2; expert DP = DP * TP / EP
    per_gpu = rank0_dense + rank0_exp / ep
    expected = {
        # the FP8 copy: GEMM weights only (not the two embeddings, the head, the final norm)
        "weights_bf16": 2 * per_gpu, "grads_fp32": 4 * per_gpu,
        "weights_fp8_copy": per_gpu - 2 * params["embedding.word_embeddings.weight"]
        - params["output_layer.weight"] - params["decoder.final_layernorm.weight"],
        "optimizer": (4 + 2 + 2) * (rank0_dense / dp + rank0_exp / ep / edp),
    }
    # activations, no recompute: rank 0 chunk 0 (layer 1, dense) holds 4 micro-batches at its peak
    h, n, f = config.hidden_size, config.num_attention_heads, config.ffn_hidden_size
    dense_tok = 2 * (h + h + (config.q_lora_rank + config.kv_lora_rank + config.qk_pos_emb_head_dim)
                     + n * (config.qk_head_dim + config.qk_pos_emb_head_dim) * 2
                     + n * config.v_head_dim + n * config.v_head_dim + h + h + 2 * f + f)
    r0 = result["per_rank"][0]
    assert r0["in_flight_micro_batches"] == {"0": 4, "1": 1}
    # chunk 1 (1 micro-batch) holds no decoder layer but the head: the MTP layer (a MoE layer)
    # and float32 logits of the main and the MTP head
    moe_tok = result["activation_bytes_per_token"]["moe_layer"]
    expected["activations"] = (4 * dense_tok + 1 * (moe_tok + 2 * 4 * config.vocab_size)) * 2 * 64
    expected["total"] = sum(expected.values())
    for k, v in expected.items():
        assert r0["memory_gib"][k] == pytest.approx(round(v / planner.GiB, 2), abs=0.011), k
    assert result["activation_bytes_per_token"]["dense_layer"] == dense_tok


@pytest.mark.parametrize("fp8", [False, True])
def test_all_to_all_bytes_are_a_hand_count(fp8, single_rank_world):
    """Proxy-like routing (4 groups, M = 2) over EP 16 = 2 nodes: a token reaches at most the
    other node once (not M = 2 copies). Per copy: forward dispatch (BF16 rows, or E4M3 rows with
    one float32 scale per 128 values) and BF16 combine; backward one BF16 dispatch and combine."""
    result = run(("--preset deepseek-v3 --num-layers 8 --first-k-dense 1 --num-experts 64 "
                  "--moe-router-num-groups 4 --moe-router-group-topk 2 --nodes 8 "
                  "--gpus-per-node 8 --pp 4 --ep 16 --schedule dualpipev --json"
                  + (" --fp8 --dispatch-fp8" if fp8 else "")).split())
    X, h = result["expert_all_to_all"], 7168
    assert X["inter_node_copies_per_token_max"] == 1
    dispatch = h + 4 * (h // 128) if fp8 else 2 * h
    assert X["forward_bytes_per_token_per_moe_layer"] == dispatch + 2 * h
    assert X["bytes_per_token_per_moe_layer"] == dispatch + 2 * h + 4 * h


def test_1f1b_mtp_stage_holds_its_own_embedding(single_rank_world):
    """Megatron's MTP stage (the last, not the first) builds its own embedding, which the MTP
    layer reads: the planner counts it there, as the model built for that stage holds it."""
    from megatron_dsv3.model import DeepSeekV3Model
    from megatron_dsv3.model_chunks import chunk_block_spec

    result = run("--preset deepseek-v3-tiny --num-layers 4 --nodes 1 --gpus-per-node 2 --pp 2 "
                 "--schedule 1f1b --mtp 1 --json".split())
    config = get_config("deepseek-v3-tiny", num_layers=4, perform_initialization=False)
    for rank in range(2):
        layers = result["placement"][str(rank)][0]
        model = DeepSeekV3Model(config, pre_process=rank == 0, post_process=rank == 1,
                                mtp_process=rank == 1,
                                transformer_layer_spec=chunk_block_spec(config, layers))
        assert hasattr(model, "embedding")  # (rank 1: the MTP layer's copy)
        built = sum(p.numel() for p in model.parameters())
        assert result["per_rank"][rank]["params_per_gpu"] == built, rank


@pytest.mark.parametrize("schedule,pp,first", [("dualpipev", 2, None), ("dualpipe", 2, None),
                                               ("dualpipe", 4, None), ("dualpipev", 2, 1)])
def test_per_rank_parameters_are_those_of_the_chunks_megatron_lm_builds(single_rank_world,
                                                                        schedule, pp, first):
    """Each rank's planned parameters against build_model_chunks (+ the embedding copy
    megatron_dsv3.pretrain_gpt unties for the MTP chunk): DualPipeV's rank 0 holds two
    embeddings, DualPipe's end ranks an embedding and a head each (one per direction). With MTP
    the final norm is in the block holding the last decoder layer: DualPipeV with one layer
    first leaves the head's stage (rank 0) without layers, and the planner counted the norm on
    rank 0 (each rank off by hidden_size)."""
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pretrain_gpt import untie_shared_embedding

    mtp = 1 if schedule == "dualpipev" else 0
    split = "" if first is None else f" --decoder-first-pipeline-num-layers {first}"
    result = run(f"--preset deepseek-v3-tiny --num-layers 4 --nodes 1 --gpus-per-node {pp} "
                 f"--pp {pp} --schedule {schedule} --mtp {mtp}{split} --json".split())
    stages = {} if first is None else {"num_layers_in_first_pipeline_stage": first,
                                       "pipeline_model_parallel_size": pp}
    config = get_config("deepseek-v3-tiny", num_layers=4, perform_initialization=False,
                        mtp_num_layers=mtp or None, **stages)
    for rank in range(pp):
        chunks = build_model_chunks(config, schedule, rank, pp)
        untie_shared_embedding(chunks)
        built = sum(p.numel() for p in {id(p): p for c in chunks for p in c.parameters()}.values())
        assert result["per_rank"][rank]["params_per_gpu"] == built, rank


def test_cli_prints_progress_free_text_and_refuses_what_does_not_fit(capsys):
    code = planner.main("--preset deepseek-v3-tiny --nodes 1 --gpus-per-node 8 --pp 2 --ep 4 "
                        "--schedule dualpipev --gpu-memory-gib 0.000001".split())
    io = capsys.readouterr()
    assert code == 3 and "does not fit" in io.err
    assert "placement (global layer numbers per chunk)" in io.out and "pp_rank   0" in io.out

