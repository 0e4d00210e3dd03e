"""Strategy: validated on construction, unknown keys suggest the right one, YAML round-trips."""

from __future__ import annotations

import pytest

import strato
from examples.custom_pass import tanh_gelu


def test_unknown_key_lists_valid_fields_with_did_you_mean():
    with pytest.raises(strato.StrategyError) as info:
        strato.Strategy.from_dict({"disabel": ["x"]})
    message = str(info.value)
    assert "unknown field 'disabel'" in message
    assert "Did you mean 'disable'?" in message
    assert "passes" in message  # lists the valid fields


def test_unknown_keyword_in_replace_is_an_error():
    with pytest.raises(strato.StrategyError, match="Did you mean 'passes'"):
        strato.Strategy().replace(pases=[])


def test_strategy_is_frozen():
    import attrs

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        strato.Strategy().disable = ("x",)


def test_bad_disable_value_names_the_field():
    with pytest.raises(strato.StrategyError, match="Strategy.disable"):
        strato.Strategy(disable=[3])


def test_bad_pass_import_path_names_the_field():
    with pytest.raises(strato.StrategyError, match="Strategy.passes: cannot import"):
        strato.Strategy.from_dict({"passes": ["examples.custom_pass:no_such_pass"]})
    with pytest.raises(strato.StrategyError, match="import path"):
        strato.Strategy.from_dict({"passes": ["no_colon_here"]})


def test_yaml_round_trip(tmp_path):
    strategy = strato.Strategy(passes=[tanh_gelu], disable=["eliminate_dead_code"])
    text = strategy.to_yaml(tmp_path / "s.yaml")
    assert "examples.custom_pass:tanh_gelu" in text
    assert strato.Strategy.from_yaml(tmp_path / "s.yaml") == strategy
    assert strato.Strategy.from_yaml(text) == strategy
    assert strato.Strategy.from_dict(strategy.to_dict()) == strategy


def test_yaml_must_be_a_mapping():
    with pytest.raises(strato.StrategyError, match="mapping"):
        strato.Strategy.from_yaml("- a\n- b\n")


def test_every_field_is_documented():
    import attrs

    from strato.compiler.strategy import field_docstrings

    docs = field_docstrings(strato.Strategy)
    missing = [f.name for f in attrs.fields(strato.Strategy) if not docs.get(f.name)]
    assert missing == [], f"Strategy fields without a docstring: {missing}"
    assert "disable" in strato.Strategy.describe()
