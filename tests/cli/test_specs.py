"""Estimator specs of ``--estimators``: NAME[:KEY=VALUE,...], comma-separated."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwardgrad.cli.specs import SPEC_KEYS, EstimatorSpec, parse_specs
from forwardgrad.experiments.methods import RUN_ESTIMATORS


def test_specs_with_and_without_options():
    specs = parse_specs("forward, forward:rank=1 ,activity,backprop:local=on")
    assert specs == [
        EstimatorSpec("forward"),
        EstimatorSpec("forward", {"tangent_rank": 1}),
        EstimatorSpec("activity"),
        EstimatorSpec("backprop", {"local_losses": True}),
    ]


def test_a_key_value_item_continues_the_spec_before_it():
    specs = parse_specs("forward:local=on,guess=local,tangents=1,zeroth-order")
    assert specs == [
        EstimatorSpec("forward", {"local_losses": True, "guess": "local", "tangents": 1}),
        EstimatorSpec("zeroth-order"),
    ]
    assert str(specs[0]) == "forward:local=on,guess=local,tangents=1"


def test_duplicates_are_dropped_in_order():
    assert parse_specs("backprop,forward,backprop") == [
        EstimatorSpec("backprop"),
        EstimatorSpec("forward"),
    ]
    twice = parse_specs("forward:rank=1,local=on,forward:local=on,rank=1")
    assert twice == [EstimatorSpec("forward", {"tangent_rank": 1, "local_losses": True})]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "at least one"),
        ("resnet", "unknown estimator 'resnet'"),
        ("rank=1,forward", "no estimator comes before it"),
        ("forward:rank", "not KEY=VALUE"),
        ("forward:width=3", "not KEY=VALUE"),
        ("forward:rank=0", "rank takes a positive integer"),
        ("forward:rank=1.5", "rank takes a positive integer"),
        ("forward:rank=-1", "rank takes a positive integer"),
        ("forward:tangents=x", "tangents takes a positive integer"),
        ("forward:local=yes", "local takes on or off"),
        ("forward:guess=global", "guess takes local"),
        ("forward:rank=1,rank=2", "sets rank twice"),
    ],
)
def test_bad_specs_are_one_sentence(text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=says) as error:
        parse_specs(text)
    assert "\n" not in str(error.value)


OPTION_VALUES = {
    "rank": st.integers(1, 64),
    "tangents": st.integers(1, 64),
    "local": st.booleans(),
    "guess": st.just("local"),
}


@st.composite
def specs_and_texts(draw) -> tuple[str, EstimatorSpec]:
    """A spec as a user would write it, and what it means."""
    name = draw(st.sampled_from(list(RUN_ESTIMATORS)))
    keys = draw(st.lists(st.sampled_from(list(SPEC_KEYS)), unique=True, max_size=4))
    values = {key: draw(OPTION_VALUES[key]) for key in keys}
    written = {k: ("on" if v else "off") if k == "local" else str(v) for k, v in values.items()}
    options = [f"{key}={value}" for key, value in written.items()]
    spec = EstimatorSpec(name, {SPEC_KEYS[key][0]: value for key, value in values.items()})
    return name + (":" + ",".join(options) if options else ""), spec


@given(st.lists(specs_and_texts(), min_size=1, max_size=5))
def test_comma_separated_specs_parse_to_what_they_mean_and_write_back(drawn):
    specs = parse_specs(",".join(text for text, _ in drawn))
    expected = []
    for _, spec in drawn:
        if spec not in expected:
            expected.append(spec)
    assert specs == expected
    assert parse_specs(",".join(map(str, specs))) == specs
