"""The CLI prints warnings meant for the user as one line, ``warning: message``."""

from __future__ import annotations

import warnings

import pytest

from conftest import make_tiny_model
from exl2core import cli


def _run(argv, capsys) -> list[str]:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(argv) == 0
    return capsys.readouterr().err.splitlines()


def test_user_warnings_are_one_line(monkeypatch, capsys):
    def command(args):
        warnings.warn("first part,\n   second part", UserWarning)
        warnings.warn("a library's deprecation", DeprecationWarning)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "plugins", command)
    before = warnings.showwarning
    with pytest.warns(DeprecationWarning, match="deprecation"):  # other categories take Python's own path
        err = _run(["plugins"], capsys)
    assert err == ["warning: first part, second part"]
    assert warnings.showwarning is before


def test_a_plugin_warning_through_the_cli(tmp_path, capsys):
    """The mixtral plugin's Qwen3-MoE warning, as ``exl2 inspect`` shows it: no file, line or category."""
    make_tiny_model(tmp_path, "qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                    norm_topk_prob=False)
    err = [line for line in _run(["inspect", str(tmp_path)], capsys) if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: Qwen3MoeForCausalLM with norm_topk_prob = false")
    assert "UserWarning" not in err[0] and ".py:" not in err[0]
