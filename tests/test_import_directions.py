"""The arrows between packages run one way (docs/architecture.md): a small AST scan of every module
of megatron_dsv3, imports inside functions included, checked against the map's rules."""

import ast
import os
from typing import Dict, Set

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_dsv3")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports() -> Dict[str, Set[str]]:
    """{module: the megatron_dsv3 modules it imports, anywhere in its code}."""
    out = {}
    for base, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            module = _module_name(path)
            package = module if name == "__init__.py" else module.rsplit(".", 1)[0]
            found = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: resolve against this module's package
                        parts = package.split(".")
                        stem = ".".join(parts[: len(parts) - node.level + 1])
                        target = f"{stem}.{node.module}" if node.module else stem
                    else:
                        target = node.module or ""
                    found.add(target)
                    # `from megatron_dsv3.x import y` may import the sub-module x.y
                    found |= {f"{target}.{a.name}" for a in node.names}
            out[module] = {m for m in found if m == "megatron_dsv3" or m.startswith("megatron_dsv3.")}
    return out


IMPORTS = _imports()


def _existing(target: str) -> str:
    """The longest prefix of `target` that is a module of ours (drops imported names)."""
    while target not in IMPORTS and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _edges(source_packages):
    for module, targets in sorted(IMPORTS.items()):
        if _in(module, *source_packages):
            for target in sorted({_existing(t) for t in targets}):
                if target != "megatron_dsv3":
                    yield module, target


# imported on every floor and import nothing of ours: lazy (package faces), upstream_flags (the
# Megatron flags honoured or refused, read by configs, core.recompute, moe.router), workspace (the
# pool of reused CPU memory of core's and dispatch's large tensors)
NEUTRAL = ["megatron_dsv3.lazy", "megatron_dsv3.upstream_flags", "megatron_dsv3.workspace"]


def _violations(sources, allowed):
    return [f"{m} imports {t}" for m, t in _edges(sources)
            if not _in(t, *allowed, *NEUTRAL) and not _in(t, *sources)]


P = "megatron_dsv3."


def test_the_scan_sees_the_packages_and_their_imports():
    assert {P + "configs", P + "moe.layer", P + "dispatch.base", P + "pipeline.executor"} <= set(IMPORTS)
    assert P + "moe.routing" in IMPORTS[P + "moe.router"]  # an import it must see


@pytest.mark.parametrize("sources,allowed", [
    # the ground floor: configs and compat, read by everything, import (almost) nothing of ours
    ([P + "compat"], []),
    ([P + "configs"], [P + "compat"]),
    ([P + "lanes"], []),
    ([P + "lazy"], []),
    ([P + "upstream_flags"], []),
    ([P + "workspace"], []),
    ([P + "cli"], []),
    ([P + "liveness"], []),
    ([P + "tokenizer"], []),
    ([P + "world"], [P + "liveness"]),
    ([P + "corpus"], [P + "tokenizer"]),
    # the layer: MLA and MoE come in through its spec, never by import
    ([P + "transformer_layer"], [P + "compat", P + "configs", P + "core"]),
    # building blocks: no FP8, no model modules; the binding hands them their GEMM
    ([P + "core"], [P + "compat", P + "configs"]),
    # fp8 knows no model module: its quantisers, the Gemm interface it implements, configs
    ([P + "fp8"], [P + "core.gemm", P + "configs", P + "compat"]),
    # pure cores: one equation of the paper each, no torch.distributed, nothing of ours
    ([P + "moe.routing"], []),
    ([P + "fp8.quant"], []),
    ([P + "dispatch.layout"], []),
    ([P + "pipeline.schedules"], [P + "pipeline.simulate", P + "configs"]),
    # dispatch moves tokens and knows no routing policy: no moe, no model
    ([P + "dispatch"], [P + "fp8.quant", P + "lanes", P + "liveness", P + "compat",
                        P + "configs"]),
    # moe asks dispatch through its interface only
    ([P + "moe"], [P + "core", P + "configs", P + "compat", P + "dispatch.base"]),
    ([P + "attention"], [P + "core", P + "configs", P + "compat"]),
    ([P + "mtp"], [P + "core", P + "configs", P + "compat", P + "transformer_layer"]),
    # the pipeline is generic over model chunks
    ([P + "pipeline"], [P + "configs", P + "compat", P + "core.gemm", P + "lanes", P + "cli"]),
])
def test_packages_import_only_downwards(sources, allowed):
    assert _violations(sources, allowed) == []


def test_moe_and_dispatch_do_not_import_each_other_both_ways():
    dispatch_to_moe = [e for e in _edges([P + "dispatch"]) if _in(e[1], P + "moe")]
    assert dispatch_to_moe == []


@pytest.mark.parametrize("package", ["attention", "moe", "mtp", "core", "configs", "fp8",
                                     "dispatch", "pipeline", "transformer_layer", "world",
                                     "liveness"])
def test_only_the_binding_chooses_plugins(package):
    """layer_specs binds modules into Megatron; nothing below it imports it (or the model)."""
    bound = [e for e in _edges([P + package])
             if _in(e[1], P + "layer_specs", P + "model", P + "model_chunks")]
    assert bound == []


@pytest.mark.parametrize("package", ["inference", "checkpoint", "generate", "plan", "pipeline",
                                     "model", "model_chunks", "pretrain_gpt", "api"])
def test_nothing_leans_on_the_example_trainer(package):
    assert [e for e in _edges([P + package]) if _in(e[1], P + "training")] == []


def test_nothing_leans_on_the_export_path():
    """export (modelopt, the optional [deploy] extra) is a top-floor entry point: no other package
    imports it, so nothing else needs modelopt."""
    assert [e for e in IMPORTS.items() if not _in(e[0], P + "export")
            and any(_in(t, P + "export") for t in e[1])] == []
