"""patches/: well-formed diffs naming real Megatron-LM paths, each documented in patches/README.md
(always); `git apply --check` against the checkout named by MEGATRON_LM_PATH (skipped without)."""

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "patches")
# one patch set per Megatron-LM release line (checked against every core_v tag of the line) and
# one for main
VERSIONS = ("core_v0.16.1", "core_v0.17", "core_v0.18", "core_v0.19", "main")
# paths these patches may touch: Megatron-LM's training package and its top-level GPT scripts
KNOWN = {"gpt_builders.py", "megatron/training/arguments.py", "megatron/training/training.py"}
MLM = os.environ.get("MEGATRON_LM_PATH")
# subprocesses import this tree's megatron_dsv3, whatever is installed
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.abspath(os.path.join(ROOT, ".."))]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


def _patches(version):
    return sorted(glob.glob(os.path.join(ROOT, version, "*.patch")))


@pytest.mark.parametrize("version", VERSIONS)
def test_patches_are_well_formed(version):
    files = _patches(version)
    assert [os.path.basename(f)[:4] for f in files] == ["0001", "0002", "0003"]
    touched = []
    for path in files:
        text = open(path).read()
        heads = re.findall(r"^diff --git a/(\S+) b/(\S+)$", text, re.M)
        assert heads, f"{path}: no 'diff --git' header"
        for a, b in heads:
            assert a == b and a in KNOWN, f"{path}: unexpected path {a}"
            touched.append(a)
        olds = re.findall(r"^--- a/(\S+)$", text, re.M)
        news = re.findall(r"^\+\+\+ b/(\S+)$", text, re.M)
        assert olds == news == [a for a, _ in heads]
        # every hunk's line counts match its header
        for m in re.finditer(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@.*\n((?:[ +\-\\].*\n?)*)",
                             text, re.M):
            old_n, new_n = int(m.group(1) or 1), int(m.group(2) or 1)
            body = [l for l in m.group(3).splitlines() if not l.startswith("\\")]
            body = body[:next((i for i, l in enumerate(body) if l.startswith("diff --git")),
                              len(body))]
            assert sum(l[:1] in " -" for l in body) == old_n, path
            assert sum(l[:1] in " +" for l in body) == new_n, path
    # patches for one version touch disjoint hunks and all of: builder, arguments, training loop
    assert set(touched) == KNOWN


def test_readme_documents_every_patch():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for version in VERSIONS:
        for path in _patches(version):
            assert os.path.basename(path) in readme, path
    assert "git apply" in readme


def _version(checkout):
    """The patch set for a checkout: from megatron/core/package_info.py, 0.16.x -> core_v0.16.1,
    0.17.x / 0.18.x / 0.19.x -> core_v0.17 / core_v0.18 / core_v0.19, anything else (main, a
    0.20 development version) -> main."""
    info = open(os.path.join(checkout, "megatron", "core", "package_info.py")).read()
    major, minor = (re.search(rf"^{k}\s*=\s*(\d+)", info, re.M).group(1)
                    for k in ("MAJOR", "MINOR"))
    release = {"16": "core_v0.16.1", "17": "core_v0.17", "18": "core_v0.18", "19": "core_v0.19"}
    return release.get(minor, "main") if major == "0" else "main"


def skip_unless_installed_core_matches(checkout):
    """Megatron-LM's training package runs against the installed megatron-core (which wins over
    the checkout's copy): their release lines must match (0.17's training code imports modules
    0.16's core does not have)."""
    import megatron.core

    info = open(os.path.join(checkout, "megatron", "core", "package_info.py")).read()
    line = ".".join(re.search(rf"^{k}\s*=\s*(\d+)", info, re.M).group(1)
                    for k in ("MAJOR", "MINOR"))
    installed = ".".join(megatron.core.__version__.split(".")[:2])
    if line != installed:
        pytest.skip(f"checkout is Megatron-LM {line}, installed megatron-core is "
                    f"{megatron.core.__version__}: run with a Python whose megatron-core is {line}")


@pytest.mark.skipif(not MLM, reason="MEGATRON_LM_PATH not set")
def test_patches_apply_to_checkout():
    version = _version(MLM)
    proc = subprocess.run(["git", "-C", MLM, "apply", "--check", *map(os.path.abspath,
                                                                      _patches(version))],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{version}: {proc.stderr}"


@pytest.mark.skipif(not MLM, reason="MEGATRON_LM_PATH not set")
def test_patched_checkout_parses_one_token_spec_with_mtp_and_schedule(tmp_path):
    """Patches applied to a copy of the checkout (megatron/ and the top-level scripts): Megatron-LM's
    own parse_args takes `--spec megatron_dsv3.layer_specs --pipeline-schedule ...`, gpt_builder
    builds our layers and, with --mtp-num-layers, our MTP layers; the training loop's schedule
    lookup answers with the named schedule. (main's training code needs Python >= 3.12.)"""
    import json
    import shutil
    import sys

    skip_unless_installed_core_matches(MLM)
    if _version(MLM) != "core_v0.16.1" and sys.version_info < (3, 12):
        pytest.skip("Megatron-LM >= 0.17's training code needs Python >= 3.12 (typing.override)")
    shutil.copytree(os.path.join(MLM, "megatron"), tmp_path / "megatron")
    for name in os.listdir(MLM):
        if name.endswith(".py"):
            shutil.copy(os.path.join(MLM, name), tmp_path / name)
    patches = [os.path.abspath(p) for p in _patches(_version(MLM))]
    proc = subprocess.run(["git", "apply", *patches], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    script = os.path.join(os.path.dirname(__file__), "patched_spec_check.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path), "--mtp-num-layers", "1",
                           "--pipeline-schedule", "no_pipelining"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["spec"] == ["megatron_dsv3.layer_specs", "layer_spec"]
    assert r["layer_classes"] == ["DeepSeekV3TransformerLayer"]
    assert r["mtp_transformer_layers"] == ["DeepSeekV3TransformerLayer"]
    assert r["schedule"].endswith("schedules.forward_backward_no_pipelining")


@pytest.mark.skipif(not MLM, reason="MEGATRON_LM_PATH not set")
def test_unpatched_checkout_rejects_one_token_spec():
    """The bug 0001 fixes: stock Megatron-LM fails to unpack `--spec megatron_dsv3.layer_specs`."""
    import sys

    skip_unless_installed_core_matches(MLM)
    if _version(MLM) != "core_v0.16.1" and sys.version_info < (3, 12):
        pytest.skip("Megatron-LM >= 0.17's training code needs Python >= 3.12 (typing.override)")

    script = os.path.join(os.path.dirname(__file__), "patched_spec_check.py")
    proc = subprocess.run([sys.executable, script, MLM, "--mtp-num-layers", "1"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0 and "not enough values to unpack" in proc.stderr
