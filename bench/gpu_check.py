"""GPU check: CUDA numerics of our FP8 path, torch's blockwise scaled matmul, GEMM throughput at
DeepSeek-V3 shapes, and the model on CUDA. Each section is independent; failures are recorded.

    OUT=/tmp/out bash bench/gpu_check.sh              # on the GPU machine
    python bench/gpu_check.py --device cpu --small    # rehearsal on CPU (numerics sections only)

Writes results.json and summary.md under --out.
"""

import argparse
import json
import math
import os
import time
import traceback

import torch

RESULTS = {}


def section(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.time()
            print(f"== {name}", flush=True)
            try:
                RESULTS[name] = {"ok": True, **fn(*a, **k)}
            except Exception as e:  # record and continue
                RESULTS[name] = {"ok": False, "error": repr(e), "trace": traceback.format_exc()[-2000:]}
            RESULTS[name]["seconds"] = round(time.time() - t0, 2)
            print(json.dumps({k: v for k, v in RESULTS[name].items() if k != "trace"})[:1500],
                  flush=True)
        return run
    return wrap


@section("environment")
def environment(device):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        info.update(name=torch.cuda.get_device_name(0),
                    capability=list(torch.cuda.get_device_capability(0)))
    try:
        import megatron.core  # noqa: F401
        import importlib.metadata as md

        info["megatron_core"] = md.version("megatron-core")
    except Exception as e:
        info["megatron_core"] = f"absent ({e!r})"
    try:
        import transformer_engine  # noqa: F401

        info["transformer_engine"] = "present"
    except Exception:
        info["transformer_engine"] = "absent (TE wheels are 276-729 MB: not carried)"
    return info


@section("quantisers_on_device_vs_cpu_float64")
def quantisers(device, small):
    from megatron_dsv3.fp8.quant import (blockwise_matmul, dequantize_1x128, dequantize_128x128,
                                         quantize_1x128, quantize_128x128)

    g = torch.Generator().manual_seed(0)
    M, N, K = (64, 256, 384) if small else (512, 2048, 7168)
    a = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, K)
    b = torch.randn(N, K, generator=g)
    out = {}
    for pow2 in (False, True):
        qa, sa = quantize_1x128(a.to(device), pow2_scales=pow2)
        qb, sb = quantize_128x128(b.to(device), pow2_scales=pow2)
        qa_c, sa_c = quantize_1x128(a, pow2_scales=pow2)
        qb_c, sb_c = quantize_128x128(b, pow2_scales=pow2)
        same_q = bool(torch.equal(qa.cpu().float(), qa_c.float()) and torch.equal(qb.cpu().float(), qb_c.float()))
        same_s = float(max((sa.cpu() - sa_c).abs().max(), (sb.cpu() - sb_c).abs().max()))
        y = blockwise_matmul(qa, sa, qb, sb, out_dtype=torch.float32).cpu().double()
        ref = dequantize_1x128(qa_c, sa_c).double() @ dequantize_128x128(qb_c, sb_c).double().t()
        exact = a.double() @ b.double().t()
        out[f"pow2={pow2}"] = {
            "same_fp8_codes_as_cpu": same_q, "max_scale_diff": same_s,
            "blockwise_matmul_rel_err_vs_f64_of_dequantised": float((y - ref).norm() / ref.norm()),
            "quantisation_rel_err_vs_exact": float((y - exact).norm() / exact.norm())}
    return out


def _torch_blockwise(qa, sa, qb, sb):
    """torch's blockwise scaled matmul: a [M,K] 1x128 tiles, b [N,K] 128x128 blocks (NT)."""
    import torch.nn.functional as F

    sa_outer = sa.t().contiguous().t()  # (M, K/128), outer-dim-major
    mat_b, sb_t = qb.t(), sb.t()  # (K, N) column-major; scales (K/128, N/128)
    errors = []
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        try:
            return F.scaled_mm(qa, mat_b, sa_outer, F.ScalingType.BlockWise1x128, sb_t,
                               F.ScalingType.BlockWise128x128, output_dtype=torch.float32), "F.scaled_mm"
        except Exception as e:
            errors.append(f"F.scaled_mm: {e!r}"[:300])
        try:
            return F.scaled_mm(qa, mat_b, sa_outer, F.ScalingType.BlockWise1x128,
                               sb_t.contiguous(), F.ScalingType.BlockWise128x128,
                               output_dtype=torch.float32), "F.scaled_mm (contiguous b scales)"
        except Exception as e:
            errors.append(f"F.scaled_mm contiguous: {e!r}"[:300])
    try:
        return torch._scaled_mm(qa, mat_b, sa_outer, sb_t, out_dtype=torch.float32), "torch._scaled_mm"
    except Exception as e:
        errors.append(f"torch._scaled_mm: {e!r}"[:300])
    raise RuntimeError("; ".join(errors))


@section("torch_blockwise_scaled_mm_vs_our_emulation")
def torch_blockwise(device, small):
    from megatron_dsv3.fp8.quant import blockwise_matmul, quantize_1x128, quantize_128x128

    if device != "cuda":
        return {"skipped": "needs CUDA"}
    out = {}
    for (M, N, K) in ([(256, 512, 1024)] if small else [(256, 512, 1024), (4096, 2048, 7168)]):
        a = torch.randn(M, K, device=device)
        b = torch.randn(N, K, device=device)
        qa, sa = quantize_1x128(a)
        qb, sb = quantize_128x128(b)
        ours = blockwise_matmul(qa, sa, qb, sb, out_dtype=torch.float32)
        theirs, api = _torch_blockwise(qa, sa, qb, sb)
        out[f"{M}x{N}x{K}"] = {"api": api,
                               "rel_diff": float((theirs - ours).norm() / ours.norm()),
                               "max_abs_diff": float((theirs - ours).abs().max())}
    return out


def _bench(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


@section("gemm_throughput_fp8_vs_bf16")
def throughput(device, small):
    from megatron_dsv3.fp8.quant import quantize_1x128, quantize_128x128

    if device != "cuda":
        return {"skipped": "needs CUDA"}
    shapes = {"expert fc1 (N=2048,K=7168)": (4096, 2048, 7168),
              "expert fc2 (N=7168,K=2048)": (4096, 7168, 2048),
              "dense fc1 (N=18432,K=7168)": (4096, 18432, 7168),
              "dense fc2 (N=7168,K=18432)": (4096, 7168, 18432)}
    out = {}
    for name, (M, N, K) in shapes.items():
        flops = 2 * M * N * K
        a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        b = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        row = {"bf16_tflops": flops / _bench(lambda: a @ b.t()) / 1e12}
        qa, sa = quantize_1x128(a)
        qb, sb = quantize_128x128(b)
        try:
            _torch_blockwise(qa, sa, qb, sb)
            row["fp8_blockwise_tflops"] = flops / _bench(lambda: _torch_blockwise(qa, sa, qb, sb)) / 1e12
        except Exception as e:
            row["fp8_blockwise_error"] = repr(e)[:300]
        try:
            one = torch.ones((), device=device)
            at, bt = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            f = lambda: torch._scaled_mm(at, bt.t(), one, one, out_dtype=torch.bfloat16)  # noqa: E731
            f()
            row["fp8_tensorwise_tflops"] = flops / _bench(f) / 1e12
        except Exception as e:
            row["fp8_tensorwise_error"] = repr(e)[:300]
        t_q = _bench(lambda: (quantize_1x128(a), quantize_128x128(b)), iters=5, warmup=2)
        row["our_torch_quantisation_ms"] = t_q * 1e3
        for k in ("fp8_blockwise_tflops", "fp8_tensorwise_tflops"):
            if k in row:
                row[k.replace("tflops", "speedup_vs_bf16")] = row[k] / row["bf16_tflops"]
        out[name] = row
    return out


@section("grouped_mm_on_device")
def grouped(device, small):
    from megatron_dsv3.core.grouped_gemm import grouped_linear
    from megatron_dsv3.core.gemm import Gemm

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    counts = [128, 0, 384, 256]
    x = torch.randn(sum(counts), 256, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 512, 256, device=device, dtype=dtype, requires_grad=True)
    y = grouped_linear(x, w, counts)
    y.float().pow(2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y2 = grouped_linear(x, w, counts, Gemm())  # per-group loop
    y2.float().pow(2).sum().backward()
    rel = lambda p, q: float((p.float() - q.float()).norm() / q.float().norm())  # noqa: E731
    return {"rel_y": rel(y, y2), "rel_dx": rel(gx, x.grad), "rel_dw": rel(gw, w.grad)}


@section("model_on_device_vs_cpu")
def model_section(device, small):
    import torch.distributed as dist

    import megatron_dsv3  # noqa: F401
    from megatron.core import parallel_state

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    if device == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    out = {}
    ids = torch.randint(0, 256, (2, 64))
    pos = torch.arange(64).expand(2, 64)
    for recipe in (None, "deepseek"):
        res = {}
        for dev in ("cpu", device):
            cfg = get_config("deepseek-v3-tiny", dsv3_fp8_recipe=recipe, use_cpu_initialization=(dev == "cpu"))
            m = build_model(cfg)
            loss = m(ids.to(dev), pos.to(dev), None, labels=ids.to(dev)).mean()
            loss.backward()
            res[dev] = (loss.item(), torch.cat([p.grad.flatten().cpu() for p in m.parameters()]))
        g_cpu, g_dev = res["cpu"][1], res[device][1]
        out[f"recipe={recipe}"] = {"loss_cpu": res["cpu"][0], f"loss_{device}": res[device][0],
                                   "grad_rel_diff": float((g_cpu - g_dev).norm() / g_cpu.norm())}
    return out


@section("training_step_throughput")
def training_throughput(device, small):
    import megatron_dsv3  # noqa: F401
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    if device != "cuda":
        return {"skipped": "needs CUDA"}
    out = {}
    # a mid-size DeepSeek-V3-shaped model (hidden 1024, 64 experts in 8 groups, top-6)
    over = dict(num_layers=4, first_k_dense_replace=1, hidden_size=1024, ffn_hidden_size=2816,
                num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_head_dim=64,
                qk_pos_emb_head_dim=32, v_head_dim=64, num_moe_experts=64,
                moe_ffn_hidden_size=256, moe_shared_expert_intermediate_size=512,
                moe_router_topk=6, moe_router_num_groups=8, moe_router_group_topk=4,
                vocab_size=32768, max_position_embeddings=2048, bf16=True,
                use_cpu_initialization=False)
    b, s = 4, 1024
    ids = torch.randint(0, 32768, (b, s), device=device)
    pos = torch.arange(s, device=device).expand(b, s)
    for recipe in (None, "deepseek"):
        m = build_model(get_config("deepseek-v3-tiny", dsv3_fp8_recipe=recipe, **over))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            loss = m(ids, pos, None, labels=ids).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()

        t = _bench(step, iters=5, warmup=2)
        out[f"recipe={recipe}"] = {"tokens_per_s": b * s / t,
                                   "params_M": sum(p.numel() for p in m.parameters()) / 1e6,
                                   "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/gpu_check_out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    environment(a.device)
    quantisers(a.device, a.small)
    torch_blockwise(a.device, a.small)
    throughput(a.device, a.small)
    grouped(a.device, a.small)
    model_section(a.device, a.small)
    training_throughput(a.device, a.small)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        for name, res in RESULTS.items():
            f.write(f"## {name}\n\n```\n{json.dumps({k: v for k, v in res.items() if k != 'trace'}, indent=1)}\n```\n\n")
    print("wrote", os.path.join(a.out, "results.json"))


if __name__ == "__main__":
    main()
