"""README.md's package table is the public API: every name it lists under a package imports from
that package (`from megatron_dsv3.fp8 import quantize_1x128`), and it has a row for every package.

A row is "| <backticked megatron_dsv3.X> | what |". In the "what" cell, a backticked span is a
name when it is a Python name (`route`, `DeepSeekV3Model`), a call (`route(logits, ...)`: the name
before the parenthesis) or a dotted name (`megatron_dsv3.moe.eplb` from the top, `hf.load_hf`
from the row's package); a span holding anything else (a command line, a flag, an assignment, a
quoted string, a path) is prose and is skipped.
"""

import dataclasses
import importlib
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
ROW = re.compile(r"^\|\s*`(megatron_dsv3(?:\.\w+)*)`\s*\|(.*)\|\s*$")
SPAN = re.compile(r"`([^`]+)`")
NAME = r"[A-Za-z_]\w*"
REFERENCE = re.compile(rf"({NAME}(?:\.{NAME})*)(?:\(.*\))?")


def names_in(cell: str):
    """The dotted names the backticked spans of a table cell refer to, in order."""
    out = []
    for span in SPAN.findall(cell):
        match = REFERENCE.fullmatch(span.strip())
        if match:
            out.append(match.group(1))
    return out


def package_table(path=os.path.join(ROOT, "README.md")):
    """[(package, [names])] of README.md's package table."""
    with open(path) as f:
        return [(m.group(1), names_in(m.group(2))) for m in map(ROW.match, f) if m]


def member(obj, name: str):
    """What `from obj import name` gives: an attribute, else a submodule of a package; a field of
    a dataclass counts as its attribute."""
    if hasattr(obj, name):
        return getattr(obj, name)
    if hasattr(obj, "__path__"):
        return importlib.import_module(f"{obj.__name__}.{name}")
    if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
        return name
    raise AttributeError(f"{getattr(obj, '__name__', obj)!r} has no attribute {name!r}")


def resolve(package: str, dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(package)
    if parts[0] == "megatron_dsv3":
        obj, parts = importlib.import_module("megatron_dsv3"), parts[1:]
    for part in parts:
        obj = member(obj, part)
    return obj


LISTED = [(package, name) for package, names in package_table() for name in names]


def test_the_parser_finds_names_and_skips_prose():
    cell = ("`quantize_1x128`, `route(logits, expert_bias, *, topk)`, `hf.load_hf`, "
            "`megatron_dsv3.moe.eplb`, `python -m megatron_dsv3.generate --stream`, `--fp8`, "
            "`fp8_recipe=\"blockwise\"`, `moe/routing.py`, `\"layernorm\"`, `a \\| b`")
    assert names_in(cell) == ["quantize_1x128", "route", "hf.load_hf", "megatron_dsv3.moe.eplb"]
    listed = dict(package_table())
    assert {"quantize_1x128", "quantize_128x128", "blockwise_matmul"} <= set(
        listed["megatron_dsv3.fp8"])
    assert "route" in listed["megatron_dsv3.moe"]
    assert "DeepSeekV3Model" in listed["megatron_dsv3.model"]
    assert len(LISTED) > 40


@pytest.mark.parametrize("package,name", LISTED, ids=[f"{p}:{n}" for p, n in LISTED])
def test_every_listed_name_imports_from_its_package(package, name):
    resolve(package, name)


def test_the_table_has_a_row_for_every_package():
    base = os.path.join(ROOT, "megatron_dsv3")
    packages = {f"megatron_dsv3.{d}" for d in os.listdir(base)
                if os.path.isfile(os.path.join(base, d, "__init__.py"))}
    rows = {package for package, _ in package_table()}
    assert packages - rows == set()
    for package in rows:  # and each row names a real module or package
        importlib.import_module(package)
