"""Megatron-LM's own training loop on CPU: one rank of a torchrun job.

    MEGATRON_LM_PATH=/path/to/Megatron-LM torchrun --nproc-per-node 2 \
        tests/integration/megatron_lm_run.py {megatron|dsv3} <Megatron-LM arguments>

`megatron`: Megatron-LM's unmodified top-level pretrain_gpt.py (run as __main__), e.g. with
`--spec megatron_dsv3.layer_specs layer_spec`; `dsv3`: our entry point megatron_dsv3.pretrain_gpt
(Megatron-LM's pretrain() with our model provider, schedule and flags). Both inside
megatron_dsv3.testing.megatron_cpu.megatron_lm_on_cpu(), the only place CUDA call sites are
redirected; pass `--distributed-backend gloo`.
"""

import os
import runpy
import sys

import megatron_dsv3  # noqa: F401
import megatron.core  # noqa: F401  (the installed megatron-core wins over the checkout's copy)

# (Python 3.11 with Megatron-LM 0.19+: tests/integration/py311/sitecustomize.py on PYTHONPATH)
if os.environ.get("MEGATRON_LM_PATH") and os.environ["MEGATRON_LM_PATH"] not in sys.path:
    sys.path.insert(0, os.environ["MEGATRON_LM_PATH"])


def main():
    MLM = os.environ["MEGATRON_LM_PATH"]
    ENTRY, ARGV = sys.argv[1], sys.argv[2:]
    if MLM not in sys.path:
        sys.path.insert(0, MLM)

    import torch  # noqa: E402

    from megatron_dsv3.testing.megatron_cpu import megatron_lm_on_cpu  # noqa: E402

    torch.set_num_threads(max(1, int(os.environ.get("DSV3_TEST_THREADS", "1"))))

    DUMP = os.environ.get("DSV3_DUMP_GRADS")
    if DUMP:
        # test instrumentation: after the first training step, the word embedding's and output
        # head's gradients (DDP's main_grad, reduced, before the optimizer step) of every chunk of
        # global rank 0, saved to DUMP
        import megatron.training.training as training

        _train_step = training.train_step

        def train_step(*a, **k):
            out = _train_step(*a, **k)
            model = a[2] if len(a) > 2 else k["model"]
            if torch.distributed.get_rank() == 0 and not os.path.exists(DUMP):
                grads = {}
                for c, chunk in enumerate(model):
                    for name, p in chunk.named_parameters():
                        if "word_embeddings" in name or "output_layer" in name:
                            g = getattr(p, "main_grad", None)
                            grads[f"{c}.{name}"] = (p.grad if g is None else g).detach().clone()
                torch.save(grads, DUMP)
            return out

        training.train_step = train_step

    with megatron_lm_on_cpu():
        if ENTRY == "megatron":
            sys.argv = [os.path.join(MLM, "pretrain_gpt.py")] + ARGV
            runpy.run_path(sys.argv[0], run_name="__main__")
        elif ENTRY == "dsv3":
            from megatron_dsv3 import pretrain_gpt

            pretrain_gpt.main(ARGV)
        else:
            raise SystemExit(f"entry {ENTRY!r}: allowed values are 'megatron', 'dsv3'")


if __name__ == "__main__":  # (not again in processes that multiprocessing spawns, e.g. 0.19's
    main()                  # checkpoint writer's Manager)
