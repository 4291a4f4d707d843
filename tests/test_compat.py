"""The megatron-core version guard: which versions import, and what a refused user is told."""

import pytest
from packaging.version import Version

from megatron_dsv3 import compat


@pytest.mark.parametrize("version", ["0.16.1", "0.17.1", "0.18.2", "0.19.0", "0.19.2"])
def test_supported_releases_pass(version):
    compat.check_supported(Version(version))


@pytest.mark.parametrize("version", ["0.16.0", "0.15.3", "0.20.0", "0.20.0rc0",
                                     "0.20.0+d98e8a6", "1.0.0"])
def test_other_versions_are_refused_with_what_to_do(version):
    with pytest.raises(ImportError) as refused:
        compat.check_supported(Version(version))
    message = str(refused.value)
    assert f"imports megatron-core {version}" in message and "0.16.1 to 0.19.x" in message
    assert "pip install 'megatron-core==0.19.*'" in message  # the command to run
    assert "checkout core_v0.19.0" in message  # how to use a Megatron-LM checkout
    assert ("not supported yet" in message) == (Version(version).release >= (0, 20))


def test_the_version_is_the_imported_megatron_core():
    import megatron.core.package_info as info

    assert compat.MCORE_VERSION == Version(info.__version__)


def test_newer_versions_run_with_a_warning_only_when_the_user_opts_in(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="newer than the versions megatron-dsv3 is tested with"):
        compat.check_supported(Version("0.20.0+d98e8a6"))
    with pytest.raises(ImportError):  # older ones stay refused
        compat.check_supported(Version("0.16.0"))
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "0")
    with pytest.raises(ImportError, match="MEGATRON_DSV3_ALLOW_UNTESTED_MCORE=1"):
        compat.check_supported(Version("0.20.0"))
