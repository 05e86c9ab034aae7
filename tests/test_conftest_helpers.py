"""The skip helpers: a missing import, data set or backend feature skips locally and fails under CI=true."""

from __future__ import annotations

import pytest
from conftest import REPO, require_data, require_module, skip_unless_ci


@pytest.mark.parametrize("ci", ["true", "TRUE"])
def test_under_ci_a_missing_module_or_data_set_fails_instead_of_skipping(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"cannot import 'jaxlora_no_such_module'.*CI=true"):
        require_module("jaxlora_no_such_module")
    with pytest.raises(pytest.fail.Exception, match=r"no data not found at .*CI=true"):
        require_data(REPO / "no-such-file", "no data")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        skip_unless_ci("no feature")


def test_outside_ci_they_skip_and_present_ones_are_returned(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"cannot import 'jaxlora_no_such_module'"):
        require_module("jaxlora_no_such_module")
    with pytest.raises(pytest.skip.Exception, match="no data not found"):
        require_data(REPO / "no-such-file", "no data")
    assert require_module("json").dumps([1]) == "[1]"
    assert require_data(REPO, "the repo") == REPO


def test_ci_profile_is_derandomized_and_reads_no_example_database():
    """Under CI=true the verdict depends on the code alone: fixed examples, no replayed database; dev explores."""
    from hypothesis import settings

    ci, dev = settings.get_profile("ci"), settings.get_profile("dev")
    assert ci.derandomize and ci.database is None
    assert not dev.derandomize
