"""GPU check of the FP8 path and the GEMM backends (docs/backends.md), issue 14's checks first:

(1) `torch_backend_gemms`: the 'torch' backend (fp8.torch_gemm.TorchBlockwiseGemm on
    F.scaled_mm) against the emulation (fp8.gemm.Fp8BlockwiseGemm): fprop/dgrad/wgrad and the
    routed experts' grouped path; identical E4M3 codes, outputs within float32 accumulation-order
    tolerance; also whether F.scaled_grouped_mm accepts blockwise scales on this build;
(2) `gemm_throughput`: FP8 vs BF16 GEMM TFLOP/s at DeepSeek-V3 shapes (7168x18432, 18432x7168,
    7168x2048 per expert) and grouped over 32 experts (torch._grouped_mm vs the 'torch'
    backend's per-expert loop);
(3) `full_width_layer` (megatron-core): one DeepSeek-V3 decoder layer at full width (hidden 7168,
    MLA, MoE with 32 local experts of width 2048, top-8, sequence 4096, micro-batch 1) forward +
    backward in BF16 and FP8, MFU against the measured dense BF16 peak;
(4) `training_50_steps` (megatron-core): 50 AdamW steps of a ~0.7B-parameter DeepSeek-V3-shaped
    model, BF16 vs FP8 on the same data, the loss curves and their relative difference.
Then the older sections: our quantisers and blockwise GEMM on CUDA against the CPU float64
reference, torch's blockwise scaled matmul against the emulation, the tiny model on the device
against the CPU and training-step throughput. Needs torch only; the megatron-core sections run
when megatron-core imports (a carried wheel, see gpu_check.sh). On CPU (--dry-run) (1) runs the
same comparison through the CPU stand-in of the kernel (fp8.torch_gemm.reference_scaled_mm, the
arguments checked by torch's meta kernel) and (3)/(4) shrink to tiny shapes.

    OUT=/tmp/out bash bench/gpu_check.sh                  # on the GPU machine (see the .sh)
    python bench/gpu_check.py --dry-run --out /tmp/gc      # rehearsal on CPU, small shapes
    python bench/gpu_check.py --sections quantisers,torch_blockwise_scaled_mm   # a subset

Every section is independent: an exception is recorded (with its traceback) and the next section
runs; results.json is rewritten after each section and summary.md at the end, both under --out.
Sections start only while the time budget (--budget seconds) lasts.
"""

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from megatron_dsv3.fp8.quant import (  # noqa: E402  (torch-only: no megatron import)
    E4M3_MAX,
    GRAD_AMAX_FLOOR,
    blockwise_matmul,
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
)

RESULTS = {}
SECTIONS = []
# DeepSeek-V3 GEMMs at 4096 tokens: (M, N, K) of y[M, N] = x[M, K] W[N, K]^T
DSV3_SHAPES = {"dense fc1 7168x18432": (4096, 18432, 7168),
               "dense fc2 18432x7168": (4096, 7168, 18432),
               "expert fc1 7168x2048": (4096, 2048, 7168),
               "expert fc2 2048x7168": (4096, 7168, 2048)}
# the order sections run in (issue 14's checks first: they must fit the device time)
ORDER = ("environment", "torch_backend_gemms", "gemm_throughput", "full_width_layer",
         "training_50_steps", "quantisers", "fp8_gemm_on_device", "torch_blockwise_scaled_mm",
         "model_on_device_vs_cpu", "training_step_throughput")
SMALL_SHAPES = {"small (N=256, K=512)": (256, 256, 512), "small (N=512, K=256)": (256, 512, 256)}


def section(name, needs_megatron=False):
    def wrap(fn):
        SECTIONS.append((name, fn, needs_megatron))
        return fn
    return wrap


def rel(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm())


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(fn, device, iters=20, warmup=3):
    """Seconds per call (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters / 1e3
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


@section("environment")
def environment(a):
    import torch.nn.functional as F

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": a.device, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "F.scaled_mm": hasattr(F, "scaled_mm"),
            "scaling_types": [n for n in dir(getattr(F, "ScalingType", object)) if "ise" in n],
            "torch._scaled_mm": hasattr(torch, "_scaled_mm")}
    if a.device.startswith("cuda"):
        info.update(name=torch.cuda.get_device_name(0),
                    capability=list(torch.cuda.get_device_capability(0)),
                    memory_GiB=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:  # the auto choice of dsv3_gemm_backend here (fp8.backends reads the config module)
        from megatron_dsv3.fp8.backends import choose_backend, probe

        info["gemm_backend_auto"] = choose_backend(None).message()
        info["capabilities"] = str(probe())
    except Exception as e:
        info["gemm_backend_auto"] = f"not determined ({type(e).__name__}: {str(e)[:200]})"
    for mod in ("triton", "megatron.core", "transformer_engine"):
        try:
            m = __import__(mod, fromlist=["_"])
            info[mod] = getattr(m, "__version__", "present")
        except Exception as e:
            info[mod] = f"absent ({type(e).__name__})"
    return info


# -- issue 14: the GEMM backends on real kernels -------------------------------------------------

def _backend_mm(dev):
    """(mm, what) for TorchBlockwiseGemm: torch's F.scaled_mm on CUDA; on CPU the stand-in that
    reads the scales by the kernel's layout, after torch's meta kernel checked the arguments."""
    from megatron_dsv3.fp8.torch_gemm import reference_scaled_mm, torch_scaled_mm

    if dev.startswith("cuda"):
        return torch_scaled_mm, "F.scaled_mm (CUDA kernel)"
    import torch.nn.functional as F

    def checked(args, out_dtype):
        meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                for t in (args.mat_a, args.mat_b, args.scale_a, args.scale_b)]
        F.scaled_mm(meta[0], meta[1], meta[2], getattr(F.ScalingType, f"BlockWise{args.recipe_a}"),
                    meta[3], getattr(F.ScalingType, f"BlockWise{args.recipe_b}"),
                    output_dtype=out_dtype)
        return reference_scaled_mm(args, out_dtype)

    return checked, "CPU stand-in (reference_scaled_mm; layouts checked by torch's meta kernel)"


def _grouped_blockwise_probe(dev):
    """Does F.scaled_grouped_mm take 1x128 / 128x128 scales on this build? (The 'torch' backend
    runs one F.scaled_mm per expert either way; this records whether a grouped kernel exists.)"""
    import torch.nn.functional as F

    if not dev.startswith("cuda") or not hasattr(F, "scaled_grouped_mm"):
        return "not tried (no CUDA or no F.scaled_grouped_mm)"
    G, M, N, K = 2, 128, 256, 256
    a = torch.zeros(G * M, K, device=dev).to(torch.float8_e4m3fn)
    b = torch.zeros(G, N, K, device=dev).to(torch.float8_e4m3fn).transpose(-2, -1)
    offs = torch.tensor([M, 2 * M], device=dev, dtype=torch.int32)
    sa = torch.ones(K // 128, G * M, device=dev).t()
    sb = torch.ones(G, N // 128, 4, device=dev).transpose(-2, -1)
    try:
        F.scaled_grouped_mm(a, b, sa, F.ScalingType.BlockWise1x128, sb,
                            F.ScalingType.BlockWise128x128, offs=offs)
        return "accepted (a grouped blockwise kernel exists: not used yet, see fp8/torch_gemm.py)"
    except Exception as e:
        return f"refused: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


@section("torch_backend_gemms")
def torch_backend_gemms(a):
    """(1) The 'torch' backend's GEMMs equal the emulation's: fprop, dgrad, wgrad and the
    routed experts (forward and backward), bf16 and float32 inputs."""
    from megatron_dsv3.core.grouped_gemm import grouped_linear
    from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm
    from megatron_dsv3.fp8.torch_gemm import TorchBlockwiseGemm

    dev = a.device
    mm, what = _backend_mm(dev)
    out = {"kernel": what, "scaled_grouped_mm_blockwise": _grouped_blockwise_probe(dev)}
    g = torch.Generator().manual_seed(5)
    shapes = [(200, 384, 448)] if a.small else [(200, 384, 448), (4096, 2048, 7168),
                                                (4096, 7168, 2048)]
    worst = 0.0
    for M, N, K in shapes:
        x = torch.randn(M, K, generator=g)
        w = torch.randn(N, K, generator=g) * 0.02
        dy = torch.randn(M, N, generator=g) * 1e-5
        # the kernel receives the device quantisers' codes: identical to the CPU ones
        q_dev, q_cpu = quantize_1x128(x.to(dev)), quantize_1x128(x)
        row = {"same_e4m3_codes_device_vs_cpu": bool(
            torch.equal(q_dev[0].cpu().view(torch.uint8), q_cpu[0].view(torch.uint8))
            and torch.equal(q_dev[1].cpu(), q_cpu[1]))}
        for pow2 in (False, True):
            ours, ref = TorchBlockwiseGemm(pow2, mm=mm), Fp8BlockwiseGemm(pow2)
            for dtype in ((torch.float32,) if a.small else (torch.float32, torch.bfloat16)):
                xd, wd, dyd = (t.to(dev, dtype) for t in (x, w, dy))
                for name, p, q in (("fprop", xd, wd), ("dgrad", dyd, wd), ("wgrad", dyd, xd)):
                    err = rel(getattr(ours, name)(p, q).float(), getattr(ref, name)(p, q).float())
                    row[f"{name} pow2={pow2} {str(dtype)[6:]}"] = err
                    worst = max(worst, err)
        out[f"{M}x{N}x{K}"] = row
    counts = [40, 0, 7, 81] if a.small else [1024, 0, 37, 3035]
    G, N, K = len(counts), 256, 384
    x = torch.randn(sum(counts), K, generator=g, device="cpu").to(dev)
    ws = (torch.randn(G, N, K, generator=g) * 0.02).to(dev)
    dy = (torch.randn(sum(counts), N, generator=g) * 1e-5).to(dev)
    res = []
    for gemm in (TorchBlockwiseGemm(mm=mm), Fp8BlockwiseGemm()):
        xr, wr = x.clone().requires_grad_(), ws.clone().requires_grad_()
        y = grouped_linear(xr, wr, counts, gemm)
        y.backward(dy)
        res.append((y, xr.grad, wr.grad))
    grouped = {k: rel(t, r) for k, t, r in zip(("y", "dx", "dw"), res[0], res[1])}
    out["grouped experts " + str(counts)] = grouped
    worst = max([worst, *grouped.values()])
    out["worst_rel_diff"] = worst
    # same codes and scales: only the kernel's accumulation order differs (float32 here;
    # bf16 inputs give bf16 outputs on both sides, rounded the same way up to one ulp)
    out["pass"] = (all(r["same_e4m3_codes_device_vs_cpu"] for r in out.values()
                       if isinstance(r, dict) and "same_e4m3_codes_device_vs_cpu" in r)
                   and worst < 1e-2 and all(v < 1e-3 for r in out.values() if isinstance(r, dict)
                                            for k, v in r.items() if k.endswith("float32")))
    return out


def _measured_bf16_peak(dev, small):
    n = 512 if small else 8192
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = bench(lambda: x @ x, dev, iters=3 if small else 30)
    return 2 * n ** 3 / t / 1e12


def _grouped_throughput(a, dev):
    """Routed experts at 4096 tokens x top-8 over 32 local experts (balanced), fc1 shape
    (N=2048 per expert... K=7168): BF16 torch._grouped_mm vs the 'torch' backend's FP8 path
    (quantisation included) and its kernels alone (pre-quantised)."""
    from megatron_dsv3.fp8.torch_gemm import BLOCKS, TorchBlockwiseGemm, prepare

    G, N, K, rows = (4, 128, 256, 128) if a.small else (32, 2048, 7168, 4096 * 8)
    counts = [rows // G] * G
    x = torch.randn(rows, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(G, N, K, device=dev, dtype=torch.bfloat16) * 0.02
    flops = 2 * rows * N * K
    out = {"experts": G, "rows": rows, "N": N, "K": K}
    offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    try:
        out["bf16_grouped_mm_tflops"] = flops / bench(
            lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs), dev,
            1 if a.small else 10) / 1e12
    except Exception as e:
        out["bf16_grouped_mm_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    mm, _ = _backend_mm(dev)
    gemm = TorchBlockwiseGemm(mm=mm)
    if dev.startswith("cuda") or a.small:
        out["fp8_torch_backend_tflops"] = flops / bench(
            lambda: gemm.grouped_fprop(x, w, counts), dev, 1 if a.small else 10) / 1e12
        q, s = quantize_1x128(x)
        blocks = gemm._expert_blocks(w)
        args = [prepare(q[g * counts[0]:(g + 1) * counts[0]], s[g * counts[0]:(g + 1) * counts[0]],
                        *blocks[g], BLOCKS) for g in range(G)]
        out["fp8_kernels_only_tflops"] = flops / bench(
            lambda: [mm(p, torch.bfloat16) for p in args], dev, 1 if a.small else 10) / 1e12
        if "bf16_grouped_mm_tflops" in out:
            for k in ("fp8_torch_backend", "fp8_kernels_only"):
                out[f"{k}_speedup_vs_bf16"] = out[f"{k}_tflops"] / out["bf16_grouped_mm_tflops"]
    return out


def _layer_flops_per_token(c, seq):
    """Forward matmul FLOPs per token of one MoE decoder layer (MLA + router + top-k routed
    experts + shared experts) and the causal attention core (half the score matrix)."""
    h, nh = c.hidden_size, c.num_attention_heads
    qk, v = c.qk_head_dim + c.qk_pos_emb_head_dim, c.v_head_dim
    mla = (h * c.q_lora_rank + c.q_lora_rank * nh * qk
           + h * (c.kv_lora_rank + c.qk_pos_emb_head_dim)
           + c.kv_lora_rank * nh * (c.qk_head_dim + v) + nh * v * h)
    shared = (c.moe_shared_expert_intermediate_size or 0) * 3 * h
    moe = h * c.num_moe_experts + c.moe_router_topk * c.moe_ffn_hidden_size * 3 * h + shared
    attention_core = nh * (qk + v) * seq / 2  # causal: on average half the keys
    return 2 * (mla + moe + attention_core)


@section("full_width_layer", needs_megatron=True)
def full_width_layer(a):
    """(3) One DeepSeek-V3 decoder layer at full width, forward + backward, BF16 and FP8 (the
    GEMM backend auto-chosen: 'torch' on an H200 without TE), MFU vs the measured BF16 peak."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.layer_specs import gemm_backend, get_layer_spec

    _megatron_world()
    dev = a.device
    if dev.startswith("cuda"):
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    seq = 32 if a.small else 4096
    width = dict(num_moe_experts=32) if not a.small else dict(
        hidden_size=128, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=32,
        qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, moe_ffn_hidden_size=128,
        moe_shared_expert_intermediate_size=128, num_moe_experts=8)
    out = {"sequence": seq, "micro_batch": 1,
           "measured_bf16_peak_tflops": _measured_bf16_peak(dev, a.small)}
    for recipe in (None, "deepseek"):
        cfg = get_config("deepseek-v3", num_layers=1, first_k_dense_replace=0, mtp_num_layers=None,
                         moe_router_num_groups=8 if not a.small else 4,
                         moe_router_group_topk=4 if not a.small else 2,
                         moe_router_topk=8 if not a.small else 2, dsv3_fp8_recipe=recipe,
                         use_cpu_initialization=not dev.startswith("cuda"), **width)
        spec = get_layer_spec(cfg)
        layer = spec.module(cfg, spec.submodules, layer_number=1).to(dev)
        x = torch.randn(seq, 1, cfg.hidden_size, device=dev, dtype=torch.bfloat16,
                        requires_grad=True)
        grad = torch.randn_like(x)

        def step():
            y, _ = layer(x)
            y.backward(grad)

        t = bench(step, dev, iters=1 if a.small else 5, warmup=1 if a.small else 2)
        flops = 3 * _layer_flops_per_token(cfg, seq) * seq  # forward + backward (2x forward)
        r = {"seconds": t, "tflops": flops / t / 1e12, "gemm_backend": gemm_backend(cfg).name,
             "params_M": sum(p.numel() for p in layer.parameters()) / 1e6}
        r["mfu"] = r["tflops"] / out["measured_bf16_peak_tflops"]
        if dev.startswith("cuda"):
            r["max_memory_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        out[f"recipe={recipe}"] = r
        del layer, x, grad
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    out["fp8_speedup_vs_bf16"] = out["recipe=None"]["seconds"] / out["recipe=deepseek"]["seconds"]
    out["targets"] = {"bf16_mfu>=0.40": out["recipe=None"]["mfu"] >= 0.40,
                      "fp8_faster_than_bf16": out["fp8_speedup_vs_bf16"] > 1.0}
    return out


def _learnable_tokens(n, batch, seq, vocab, seed):
    """Batches of a fixed random bigram process (each token picks one of 4 successors): a
    language a small model learns within a few dozen steps, the same for both runs."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    data = []
    for _ in range(n):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        pick = torch.randint(0, 4, (batch, seq), generator=g)
        for t in range(1, seq):
            ids[:, t] = successors[ids[:, t - 1], pick[:, t]]
        data.append(ids)
    return data


@section("training_50_steps", needs_megatron=True)
def training_50_steps(a):
    """(4) 50 AdamW steps of a ~0.7B-parameter DeepSeek-V3-shaped model (BF16 parameters), BF16
    vs FP8 from the same initialisation on the same batches: loss curves and their relative
    difference (mean of the last 10 steps)."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.layer_specs import gemm_backend
    from megatron_dsv3.model import build_model

    _megatron_world()
    dev = a.device
    if dev.startswith("cuda"):
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    steps = 3 if a.small else 50
    over = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                q_lora_rank=64, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
                v_head_dim=16, num_moe_experts=8, moe_ffn_hidden_size=128,
                moe_shared_expert_intermediate_size=128, moe_router_topk=2,
                moe_router_num_groups=4, moe_router_group_topk=2, vocab_size=512,
                max_position_embeddings=256, original_max_position_embeddings=256,
                rotary_scaling_factor=1) if a.small else dict(
        num_layers=6, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
        q_lora_rank=768, kv_lora_rank=256, qk_head_dim=128, qk_pos_emb_head_dim=64,
        v_head_dim=128, num_moe_experts=32, moe_ffn_hidden_size=512,
        moe_shared_expert_intermediate_size=1024, moe_router_topk=8, moe_router_num_groups=8,
        moe_router_group_topk=4, vocab_size=32768, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rotary_scaling_factor=1)
    b, s = (2, 64) if a.small else (4, 2048)
    data = _learnable_tokens(steps, b, s, over["vocab_size"], seed=0)
    pos = torch.arange(s, device=dev).expand(b, s)
    out = {"batch": [b, s], "steps": steps}
    for recipe in (None, "deepseek"):
        cfg = get_config("deepseek-v3", first_k_dense_replace=1, dsv3_fp8_recipe=recipe,
                         use_cpu_initialization=not dev.startswith("cuda"), **over)
        m = build_model(cfg).to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        losses = []
        t0 = time.time()
        for ids in data:
            ids = ids.to(dev)
            loss = m(ids, pos, None, labels=ids).float().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        out[f"recipe={recipe}"] = {"losses": losses, "seconds": time.time() - t0,
                                   "gemm_backend": gemm_backend(cfg).name,
                                   "params_M": sum(p.numel() for p in m.parameters()) / 1e6}
        del m, opt
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    bf16, fp8 = out["recipe=None"]["losses"], out["recipe=deepseek"]["losses"]
    tail = min(10, steps)
    ref = sum(bf16[-tail:]) / tail
    out["final_loss_rel_diff"] = abs(sum(fp8[-tail:]) / tail - ref) / ref
    out["max_step_rel_diff"] = max(abs(x - y) / abs(y) for x, y in zip(fp8, bf16))
    out["loss_decreased"] = bf16[-1] < bf16[0] and fp8[-1] < fp8[0]
    out["targets"] = {"fp8_within_0.25%_of_bf16": out["final_loss_rel_diff"] <= 2.5e-3}
    return out


@section("quantisers")
def quantisers(a):
    """Device quantisers give the CPU's E4M3 codes and scales; blockwise_matmul on the device
    equals the float64 product of the CPU-dequantised operands; special values behave."""
    dev = a.device
    g = torch.Generator().manual_seed(0)
    M, N, K = (64, 256, 384) if a.small else (512, 2048, 7168)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, K)  # wide range along K
    w = torch.randn(N, K, generator=g)
    out = {"shape_MNK": [M, N, K]}
    for pow2 in (False, True):
        qx, sx = quantize_1x128(x.to(dev), pow2_scales=pow2)
        qw, sw = quantize_128x128(w.to(dev), pow2_scales=pow2)
        qx_c, sx_c = quantize_1x128(x, pow2_scales=pow2)
        qw_c, sw_c = quantize_128x128(w, pow2_scales=pow2)
        ref = dequantize_1x128(qx_c, sx_c).double() @ dequantize_128x128(qw_c, sw_c).double().t()
        y = blockwise_matmul(qx, sx, qw, sw, out_dtype=torch.float32)
        # wgrad-style: both operands 1x128 (b = x itself, reduction along K)
        y11 = blockwise_matmul(qx, sx, qx, sx, out_dtype=torch.float32)
        ref11 = dequantize_1x128(qx_c, sx_c).double() @ dequantize_1x128(qx_c, sx_c).double().t()
        same_codes = (torch.equal(qx.cpu().view(torch.uint8), qx_c.view(torch.uint8))
                      and torch.equal(qw.cpu().view(torch.uint8), qw_c.view(torch.uint8)))
        r = {"same_e4m3_codes": bool(same_codes),
             "same_scales": bool(torch.equal(sx.cpu(), sx_c) and torch.equal(sw.cpu(), sw_c)),
             "blockwise_matmul_rel_err_vs_f64": rel(y, ref),
             "blockwise_matmul_1x128_1x128_rel_err_vs_f64": rel(y11, ref11),
             "quantisation_rel_err_vs_exact": rel(y, x.double() @ w.double().t())}
        if pow2:
            s = torch.cat([sx.flatten(), sw.flatten()])
            r["scales_are_powers_of_2"] = bool(
                torch.equal(s, torch.exp2(torch.round(torch.log2(s)))))
            r["no_saturation"] = bool(((x.to(dev) / sx.repeat_interleave(128, -1)[:, :K]).abs()
                                       <= E4M3_MAX).all())
        out[f"pow2={pow2}"] = r
    z = torch.zeros(2, 256, device=dev)
    z[1, 3] = float("inf")
    qz, sz = quantize_1x128(z)
    dz = dequantize_1x128(qz, sz)
    out["zero_tile_scale_finite_and_exact_zeros"] = bool(torch.isfinite(sz[0]).all()
                                                         and (dz[0] == 0).all())
    out["inf_tile_is_nan_other_tile_finite"] = bool(torch.isnan(dz[1, :128]).all()
                                                    and (dz[1, 128:] == 0).all())
    out["pass"] = all([out["pow2=False"]["same_e4m3_codes"], out["pow2=True"]["same_e4m3_codes"],
                       out["pow2=False"]["same_scales"], out["pow2=True"]["same_scales"],
                       out["pow2=True"]["scales_are_powers_of_2"],
                       out["pow2=True"]["no_saturation"],
                       out["zero_tile_scale_finite_and_exact_zeros"],
                       out["inf_tile_is_nan_other_tile_finite"]]
                      + [out[f"pow2={p}"][k] < 1e-5 for p in (False, True) for k in
                         ("blockwise_matmul_rel_err_vs_f64",
                          "blockwise_matmul_1x128_1x128_rel_err_vs_f64")])
    return out


@section("fp8_gemm_on_device")
def fp8_gemm_on_device(a):
    """Fp8BlockwiseGemm's fprop/dgrad/wgrad and the routed experts' grouped path on the device
    against float64 products of the CPU-quantised operands."""
    from megatron_dsv3.core.grouped_gemm import grouped_linear
    from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm

    dev = a.device
    g = torch.Generator().manual_seed(1)
    M, N, K = (160, 128, 256) if a.small else (1024, 1024, 2048)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    dy = torch.randn(M, N, generator=g) * 1e-4

    def q1(t, floor=1e-4):
        return dequantize_1x128(*quantize_1x128(t, amax_floor=floor)).double()

    def qb(t):
        return dequantize_128x128(*quantize_128x128(t)).double()

    gemm = Fp8BlockwiseGemm()
    out = {"fprop_rel_err": rel(gemm.fprop(x.to(dev), w.to(dev)), q1(x) @ qb(w).t()),
           "dgrad_rel_err": rel(gemm.dgrad(dy.to(dev), w.to(dev)), q1(dy, GRAD_AMAX_FLOOR) @ qb(w)),
           "wgrad_rel_err": rel(gemm.wgrad(dy.to(dev), x.to(dev)),
                                q1(dy.t(), GRAD_AMAX_FLOOR) @ q1(x.t()).t())}
    counts = [M // 2, 0, M - M // 2]
    ws = torch.randn(3, N, K, generator=g)
    xd = x.to(dev).requires_grad_()
    wd = ws.to(dev).requires_grad_()
    y = grouped_linear(xd, wd, counts, gemm)
    y.backward(dy.to(dev))
    ref_y = torch.cat([q1(x[:M // 2]) @ qb(ws[0]).t(), q1(x[M // 2:]) @ qb(ws[2]).t()])
    out["grouped_fprop_rel_err"] = rel(y, ref_y)
    out["grouped_wgrad_rel_err"] = rel(wd.grad[2], q1(dy[M // 2:].t(), GRAD_AMAX_FLOOR)
                                       @ q1(x[M // 2:].t()).t())
    out["pass"] = all(v < 1e-5 for v in out.values())
    return out


def _scaling_type(name):
    """F.ScalingType member by normalised name (BlockWise1x128 or Blockwise_1x128, by version)."""
    import torch.nn.functional as F

    st = F.ScalingType
    for attr in dir(st):
        if attr.lower().replace("_", "") == name.lower().replace("_", ""):
            return getattr(st, attr)
    raise AttributeError(f"F.ScalingType has no {name} ({[n for n in dir(st) if 'ise' in n]})")


def torch_blockwise(qx, sx, qb, sb, out_dtype=torch.bfloat16, b_tiles="128x128", only=None):
    """torch's DeepSeek-style scaled GEMM y = x b^T: x [M, K] in 1x128 tiles (sx [M, kb]), b [N, K]
    in 128x128 blocks (sb [ceil(N/128), kb], fprop/dgrad) or 1x128 tiles (sb [N, kb], wgrad).
    Tries F.scaled_mm (torch >= 2.10), then the legacy torch._scaled_mm, each with the scale
    layouts its checks ask for (`only`: just the API whose name starts with it). Returns
    (y, api, errors of the failed tries)."""
    import torch.nn.functional as F

    kb = sx.shape[1]
    sx_outer = sx.t().contiguous().t()  # [M, kb], strides (1, M): "outer-dim-major"
    if b_tiles == "128x128":
        l4 = -(-kb // 4) * 4  # F.scaled_mm wants the K blocks padded to a multiple of 4
        sb_v2 = torch.nn.functional.pad(sb, (0, l4 - kb)).t() if l4 != kb else sb.contiguous().t()
        sb_legacy = sb.contiguous().t()  # [kb, nb]; its transpose is row-major [nb, kb]
    else:
        sb_v2 = sb.t().contiguous().t()  # [N, kb], strides (1, N)
        sb_legacy = sb.t().contiguous()  # [kb, N]
    errors, tries = [], []
    if hasattr(F, "scaled_mm"):
        tries.append((f"F.scaled_mm(1x128, {b_tiles})", lambda: F.scaled_mm(
            qx, qb.t(), sx_outer, _scaling_type("BlockWise1x128"), sb_v2,
            _scaling_type(f"BlockWise{b_tiles}"), output_dtype=out_dtype)))
    tries.append((f"torch._scaled_mm(1x128, {b_tiles})", lambda: torch._scaled_mm(
        qx, qb.t(), sx_outer, sb_legacy, out_dtype=out_dtype)))
    for api, fn in tries:
        if only is not None and not api.startswith(only):
            continue
        try:
            return fn(), api, errors
        except Exception as e:
            errors.append(f"{api}: {type(e).__name__}: {str(e)[:600]}")
    raise RuntimeError(" | ".join(errors))


def _meta_layout_check(M, N, K, b_tiles):
    """Do this torch's shape/stride checks (its meta kernels) accept our scale layouts?"""
    kb = -(-K // 128)
    nb = -(-N // 128) if b_tiles == "128x128" else N
    e4m3 = torch.float8_e4m3fn
    args = (torch.empty(M, K, dtype=e4m3, device="meta"), torch.empty(M, kb, device="meta"),
            torch.empty(N, K, dtype=e4m3, device="meta"), torch.empty(nb, kb, device="meta"))
    verdict = {}
    for api in ("F.scaled_mm", "torch._scaled_mm"):
        try:
            torch_blockwise(*args, b_tiles=b_tiles, only=api)
            verdict[api] = "accepted"
        except Exception as e:
            verdict[api] = " ".join(str(e).split())[:600]
    return verdict


@section("torch_blockwise_scaled_mm")
def torch_blockwise_section(a):
    """torch's blockwise FP8 GEMMs on the same E4M3 codes and scales as our emulation:
    1x128 x 128x128 (fprop/dgrad) and 1x128 x 1x128 (wgrad)."""
    dev = a.device
    out = {}
    shapes = [(256, 512, 1024)] if a.small else [(256, 512, 1024), (4096, 2048, 7168)]
    for M, N, K in shapes:
        x, w = torch.randn(M, K, device=dev), torch.randn(N, K, device=dev)
        qx, sx = quantize_1x128(x)
        for b_tiles, (qb, sb) in (("128x128", quantize_128x128(w)), ("1x128", quantize_1x128(w))):
            ours = blockwise_matmul(qx, sx, qb, sb, out_dtype=torch.float32)
            row = {"meta_layout_check": _meta_layout_check(M, N, K, b_tiles)}
            for out_dtype in (torch.float32, torch.bfloat16):
                key = str(out_dtype).replace("torch.", "")
                try:
                    theirs, api, failed = torch_blockwise(qx, sx, qb, sb, out_dtype, b_tiles)
                    row[key] = {"api": api, "rel_diff_vs_ours": rel(theirs, ours),
                                "failed_tries": failed}
                except Exception as e:
                    row[key] = {"error": str(e)[:1500]}
            out[f"{M}x{N}x{K} 1x128 x {b_tiles}"] = row
    # Same codes and scales, so the difference is accumulation only: our float32 sums per block
    # against the tensor cores' (limited-precision, ~14-bit per DeepSeek-V3 section 3.3.2) sums
    # inside each 128-block, plus BF16 rounding of the output. Recorded; gross errors fail.
    ok = [r[k]["rel_diff_vs_ours"] < (2e-3 if k == "float32" else 6e-3)
          for r in out.values() for k in ("float32", "bfloat16") if "rel_diff_vs_ours" in r[k]]
    if ok:
        out["pass"] = all(ok)
    else:
        out["status"] = "unavailable: no torch blockwise GEMM ran on this device"
    return out


@section("gemm_throughput")
def gemm_throughput(a):
    """TFLOP/s of BF16 and FP8 GEMMs (blockwise 1x128 x 128x128, per-row, per-tensor scaling),
    and of our emulation (quantise + dequantise + FP32 GEMM), at DeepSeek-V3 shapes."""
    from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm

    dev = a.device
    iters = 3 if a.small else 20
    out = {}
    for name, (M, N, K) in (SMALL_SHAPES if a.small else DSV3_SHAPES).items():
        flops = 2 * M * N * K
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        row = {"M": M, "N": N, "K": K}
        row["bf16_tflops"] = flops / bench(lambda: x @ w.t(), dev, iters) / 1e12
        qx, sx = quantize_1x128(x)
        qw, sw = quantize_128x128(w)
        fx, fw = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        sr_x = torch.rand(M, 1, device=dev) + 0.5  # per-row (token) and per-column (channel)
        sr_w = torch.rand(1, N, device=dev) + 0.5
        candidates = {
            "fp8_blockwise": lambda: torch_blockwise(qx, sx, qw, sw)[0],
            "fp8_rowwise": lambda: torch._scaled_mm(fx, fw.t(), sr_x, sr_w,
                                                    out_dtype=torch.bfloat16),
            "fp8_tensorwise": lambda: torch._scaled_mm(fx, fw.t(), one, one,
                                                       out_dtype=torch.bfloat16),
        }
        for key, fn in candidates.items():
            try:
                fn()
                row[f"{key}_tflops"] = flops / bench(fn, dev, iters) / 1e12
                row[f"{key}_speedup_vs_bf16"] = row[f"{key}_tflops"] / row["bf16_tflops"]
            except Exception as e:
                row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if "fp8_blockwise_tflops" in row:
            row["fp8_blockwise_api"] = torch_blockwise(qx, sx, qw, sw)[1]
        if dev.startswith("cuda"):  # the 'torch' backend's fprop, quantisation included
            from megatron_dsv3.fp8.torch_gemm import TorchBlockwiseGemm

            backend = TorchBlockwiseGemm()
            try:
                row["torch_backend_fprop_tflops"] = flops / bench(
                    lambda: backend.fprop(x, w), dev, iters) / 1e12
                row["torch_backend_fprop_speedup_vs_bf16"] = (row["torch_backend_fprop_tflops"]
                                                             / row["bf16_tflops"])
            except Exception as e:
                row["torch_backend_fprop_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        gemm = Fp8BlockwiseGemm()
        t_emulated = bench(lambda: gemm.fprop(x, w), dev, max(2, iters // 5))
        row["emulated_fp8_tflops"] = flops / t_emulated / 1e12
        row["quantise_x_1x128_ms"] = 1e3 * bench(lambda: quantize_1x128(x), dev, iters)
        row["quantise_w_128x128_ms"] = 1e3 * bench(lambda: quantize_128x128(w), dev, iters)
        out[name] = row
        del x, w, qx, qw, fx, fw
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    try:
        out["grouped 32 experts"] = _grouped_throughput(a, dev)
    except Exception as e:
        out["grouped 32 experts"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    big = out.get("dense fc1 7168x18432", {})
    if "fp8_blockwise_speedup_vs_bf16" in big:
        out["target_fp8_blockwise>=1.6x_bf16_at_7168x18432"] = (
            big["fp8_blockwise_speedup_vs_bf16"] >= 1.6)
    return out


def _megatron_world():
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


@section("model_on_device_vs_cpu", needs_megatron=True)
def model_section(a):
    """deepseek-v3-tiny (same keyed init on both devices) with and without the FP8 recipe:
    loss and gradients on the device against the CPU."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    _megatron_world()
    dev = a.device
    if dev.startswith("cuda"):
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    ids = torch.randint(0, 256, (2, 64))
    pos = torch.arange(64).expand(2, 64)
    out = {}
    for recipe in (None, "deepseek"):
        res = {}
        for d in ("cpu", dev):
            # (the backend is chosen per process: on the GPU machine auto picks 'torch', whose
            # blockwise scaled_mm has no CPU kernel; the CPU copy is the emulation, the reference)
            cfg = get_config("deepseek-v3-tiny", dsv3_fp8_recipe=recipe,
                             use_cpu_initialization=(d == "cpu"),
                             dsv3_gemm_backend="emulated" if d == "cpu" else None)
            m = build_model(cfg)
            loss = m(ids.to(d), pos.to(d), None, labels=ids.to(d)).mean()
            loss.backward()
            res[d] = (loss.item(), torch.cat([p.grad.flatten().cpu() for p in m.parameters()]))
        out[f"recipe={recipe}"] = {"loss_cpu": res["cpu"][0], "loss_device": res[dev][0],
                                   "grad_rel_diff": rel(res[dev][1], res["cpu"][1])}
    out["pass"] = all(abs(r["loss_cpu"] - r["loss_device"]) < 1e-3 * abs(r["loss_cpu"])
                      and r["grad_rel_diff"] < 1e-2 for r in out.values())
    return out


@section("training_step_throughput", needs_megatron=True)
def training_throughput(a):
    """Tokens/s of forward + backward + AdamW for a mid-size DeepSeek-V3-shaped model, BF16 vs
    the FP8 recipe on the GEMM backend auto picks (logged: 'torch' on an H200 without TE; on the
    emulation, FP8 costs time and this is no speed claim for it)."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    _megatron_world()
    dev = a.device
    over = {} if a.small else dict(
        num_layers=4, first_k_dense_replace=1, hidden_size=1024, ffn_hidden_size=2816,
        num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_head_dim=64,
        qk_pos_emb_head_dim=32, v_head_dim=64, num_moe_experts=64, moe_ffn_hidden_size=256,
        moe_shared_expert_intermediate_size=512, moe_router_topk=6, moe_router_num_groups=8,
        moe_router_group_topk=4, vocab_size=32768, max_position_embeddings=2048)
    over["use_cpu_initialization"] = not dev.startswith("cuda")
    b, s = (2, 64) if a.small else (4, 1024)
    vocab = over.get("vocab_size", 256)
    ids = torch.randint(0, vocab, (b, s), device=dev)
    pos = torch.arange(s, device=dev).expand(b, s)
    out = {"batch": [b, s]}
    for recipe in (None, "deepseek"):
        m = build_model(get_config("deepseek-v3-tiny", dsv3_fp8_recipe=recipe, **over))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16,
                                enabled=dev.startswith("cuda")):
                loss = m(ids, pos, None, labels=ids).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()

        t = bench(step, dev, iters=2 if a.small else 5, warmup=1 if a.small else 2)
        out[f"recipe={recipe}"] = {"tokens_per_s": b * s / t,
                                   "params_M": sum(p.numel() for p in m.parameters()) / 1e6}
        del m, opt
    return out


def megatron_importable():
    try:
        import megatron.core  # noqa: F401
        return True
    except Exception:
        return False


def write(out_dir):
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def summary(out_dir):
    lines = ["# GPU check summary", ""]
    env = RESULTS.get("environment", {})
    lines.append(f"{env.get('name', env.get('device'))}, torch {env.get('torch')}, "
                 f"CUDA {env.get('cuda')}, capability {env.get('capability')}")
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    for name, r in RESULTS.items():
        if "skipped" in r:
            status = f"skipped: {r['skipped']}"
        elif "error" in r:
            status = "error: " + r["error"].splitlines()[0][:160]
        elif "pass" in r:
            status = "PASS" if r["pass"] else "FAIL"
        else:
            status = r.get("status", "ran")
        lines.append(f"| {name} | {status} | {r.get('seconds', '')} |")
    tp = RESULTS.get("gemm_throughput", {})
    rows = {k: v for k, v in tp.items() if isinstance(v, dict) and "bf16_tflops" in v}
    if rows:
        lines += ["", "GEMM TFLOP/s (speedup vs BF16):", "",
                  "| GEMM (M=tokens) | BF16 | FP8 1x128x128x128 | FP8 per-row | FP8 per-tensor "
                  "| our emulation |", "|---|---|---|---|---|---|"]

        def cell(r, k):
            if f"{k}_tflops" not in r:
                return "n/a" if f"{k}_error" in r else ""
            return f"{r[f'{k}_tflops']:.3g} ({r[f'{k}_speedup_vs_bf16']:.2f}x)"

        for name, r in rows.items():
            lines.append(f"| {name} M={r['M']} | {r['bf16_tflops']:.3g} "
                         f"| {cell(r, 'fp8_blockwise')} | {cell(r, 'fp8_rowwise')} "
                         f"| {cell(r, 'fp8_tensorwise')} | {r['emulated_fp8_tflops']:.3g} |")
        for name, r in rows.items():
            if "torch_backend_fprop_tflops" in r:
                lines.append(f"- 'torch' backend fprop {name} (quantisation included): "
                             f"{cell(r, 'torch_backend_fprop')}")
    grouped = tp.get("grouped 32 experts")
    if isinstance(grouped, dict):
        lines.append("- grouped experts: " + json.dumps(
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in grouped.items()}))
    for key in [k for k in tp if k.startswith("target_")]:
        lines.append(f"- {key}: {tp[key]}")
    tg = RESULTS.get("torch_backend_gemms", {})
    if "worst_rel_diff" in tg:
        lines.append(f"- (1) 'torch' backend vs emulation ({tg['kernel']}): worst rel diff "
                     f"{tg['worst_rel_diff']:.2e}; F.scaled_grouped_mm blockwise: "
                     f"{tg['scaled_grouped_mm_blockwise']}")
    fl = RESULTS.get("full_width_layer", {})
    for k in ("recipe=None", "recipe=deepseek"):
        if k in fl:
            r = fl[k]
            lines.append(f"- (3) full-width layer {k} ({r['gemm_backend']}): {r['seconds']*1e3:.1f} "
                         f"ms fwd+bwd, {r['tflops']:.3g} TFLOP/s, MFU {r['mfu']:.1%} of the "
                         f"measured BF16 peak {fl['measured_bf16_peak_tflops']:.3g} TFLOP/s")
    if "fp8_speedup_vs_bf16" in fl:
        lines.append(f"- (3) FP8 layer speedup vs BF16: {fl['fp8_speedup_vs_bf16']:.2f}x; "
                     f"targets {fl['targets']}")
    tr = RESULTS.get("training_50_steps", {})
    if "final_loss_rel_diff" in tr:
        b, f8 = tr["recipe=None"]["losses"], tr["recipe=deepseek"]["losses"]
        lines.append(f"- (4) {tr['steps']} steps, {tr['recipe=None']['params_M']:.0f}M params: "
                     f"BF16 loss {b[0]:.4f} -> {b[-1]:.4f}, FP8 ({tr['recipe=deepseek']['gemm_backend']})"
                     f" {f8[0]:.4f} -> {f8[-1]:.4f}; last-10 mean rel diff "
                     f"{tr['final_loss_rel_diff']:.3%}, max per-step {tr['max_step_rel_diff']:.3%};"
                     f" targets {tr['targets']}")
    tb = RESULTS.get("torch_blockwise_scaled_mm", {})
    for shape, r in tb.items():
        if isinstance(r, dict) and "float32" in r:
            for k in ("float32", "bfloat16"):
                v = r[k]
                lines.append(f"- torch blockwise {shape}, {k} out: "
                             + (f"{v['api']}, rel diff vs our emulation {v['rel_diff_vs_ours']:.2e}"
                                if "api" in v else "unavailable: "
                                + " ".join(v.get("error", "").split())[:300]))
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check_out"))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--small", action="store_true", help="small shapes")
    p.add_argument("--dry-run", action="store_true", help="CPU, small shapes (rehearsal)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds; later sections skip")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of: " + ", ".join(n for n, _, _ in SECTIONS))
    a = p.parse_args()
    if not (a.budget > 0 and a.budget != float("inf")):
        p.error(f"--budget {a.budget} is invalid: allowed values are seconds > 0")
    if a.device is not None:
        try:
            torch.device(a.device)
        except RuntimeError:
            p.error(f"--device {a.device!r} is invalid: allowed are cpu, cuda, cuda:N")
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as error:
        p.error(f"--out {a.out}: cannot create it ({error.strerror or error})")
    if a.dry_run:
        a.device, a.small = "cpu", True
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    wanted = None if a.sections is None else set(a.sections.split(","))
    unknown = (wanted or set()) - {n for n, _, _ in SECTIONS}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; allowed: "
                         f"{[n for n, _, _ in SECTIONS]}")
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs of the emulation stay float32
    torch.backends.cudnn.allow_tf32 = False
    have_megatron = megatron_importable()
    t_start = time.time()
    for name, fn, needs_megatron in sorted(SECTIONS, key=lambda sec: ORDER.index(sec[0])):
        if wanted is not None and name not in wanted and name != "environment":
            continue
        elapsed = time.time() - t_start
        print(f"== {name} (t={elapsed:.0f}s)", flush=True)
        if elapsed > a.budget:
            RESULTS[name] = {"skipped": f"time budget of {a.budget:.0f}s spent"}
        elif needs_megatron and not have_megatron:
            RESULTS[name] = {"skipped": "megatron-core not importable (optional section)"}
        else:
            t0 = time.time()
            try:
                RESULTS[name] = fn(a)
            except Exception as e:  # record and continue with the next section
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                                 "trace": traceback.format_exc()[-3000:]}
            RESULTS[name]["seconds"] = round(time.time() - t0, 2)
        print(json.dumps({k: v for k, v in RESULTS[name].items() if k != "trace"},
                         default=str)[:2000], flush=True)
        write(a.out)
    summary(a.out)
    print(open(os.path.join(a.out, "summary.md")).read(), flush=True)
    print(f"wrote {a.out}/results.json and summary.md in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
