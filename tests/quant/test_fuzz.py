"""Fuzzing: the quantizer on arbitrary tensors, the recipe reader on arbitrary structures."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qat.quant import FakeQuantizer, QuantSpec, Recipe

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1.0, -1.0])
values = st.one_of(finite32, special)


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    n = math.prod(shape)
    if draw(st.booleans()):
        flat = [draw(values)] * n  # constant tensors
    else:
        flat = draw(st.lists(values, min_size=n, max_size=n))
    return torch.tensor(flat, dtype=torch.float32).reshape(shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=tensors(),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["per_tensor", "per_channel", "per_token"]),
    learn=st.sampled_from(["none", "lsq"]),
)
def test_quantizer_on_arbitrary_tensors_is_finite_on_grid_and_idempotent(
    x, bits, symmetric, granularity, learn
):
    dynamic = granularity == "per_token"
    spec = QuantSpec(
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,
        dynamic=dynamic,
        learn="none" if dynamic else learn,
    )
    role = "input" if granularity != "per_channel" else "weight"
    fq = FakeQuantizer(spec, role=role, shape=tuple(x.shape))
    y = fq(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    if not dynamic:
        fq.observer_enabled.fill_(False)
        assert torch.equal(fq(y), y)
        s, z = fq.qparams()
        assert torch.isfinite(s).all() and (s > 0).all()
        assert (z >= spec.qmin).all() and (z <= spec.qmax).all()


json_like = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-10, 300),
        st.floats(allow_nan=True),
        st.text(max_size=8),
        st.sampled_from(["Linear", "per_group", "lsq", "fold", "re:(", "*", "first"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(
                    [
                        "rules",
                        "match",
                        "types",
                        "names",
                        "weight",
                        "input",
                        "bits",
                        "granularity",
                        "group_size",
                        "schedule",
                        "bn",
                        "calibrate",
                        "ignore",
                        "optional",
                        "learn",
                        "position",
                    ]
                ),
                st.text(max_size=5),
                st.integers(),
            ),
            children,
            max_size=5,
        ),
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(data=json_like)
def test_recipe_reader_validates_or_raises_value_error_with_a_path(data):
    try:
        Recipe.from_dict(data)
    except ValueError as e:
        assert ": got " in str(e) or "schedule" in str(e), str(e)


@settings(max_examples=200, deadline=None)
@given(
    rules=st.lists(
        st.fixed_dictionaries(
            {
                "match": st.fixed_dictionaries({"types": st.just(["Linear"])}),
                "weight": st.dictionaries(
                    st.sampled_from(
                        ["bits", "granularity", "group_size", "learn", "symmetric", "observer"]
                    ),
                    st.one_of(
                        st.integers(1, 9),
                        st.booleans(),
                        st.sampled_from(["per_group", "per_channel", "lsq", "pact", "mse"]),
                    ),
                    max_size=4,
                ),
            }
        ),
        min_size=1,
        max_size=3,
    )
)
def test_resolving_fuzzed_rules_against_a_model_raises_only_value_error(rules):
    import qat

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    try:
        qat.plan(model, {"rules": rules})
    except ValueError as e:
        assert "rules[" in str(e), str(e)
