"""Every example is a CLI whose --help exits cleanly and offers the --quick mode its test runs."""

from __future__ import annotations

import pytest
from conftest import load_example


@pytest.mark.parametrize("name", ["mnist", "regression", "toy_mlp", "gpt2_spam", "low_rank", "llama_sft", "serve"])
def test_help_exits_cleanly_and_offers_quick(name, capsys):
    example = load_example(name)
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
