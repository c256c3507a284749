import pytest
import torch

from qat.quant import FakeQuantizer, NonFiniteInputError, QuantSpec


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 9}, r"spec\.bits: got 9; allowed: an integer from 2 to 8"),
        ({"bits": 1}, r"spec\.bits: got 1"),
        ({"granularity": "per_row"}, r"spec\.granularity: got 'per_row'; allowed: per_tensor"),
        ({"observer": "kl"}, r"spec\.observer: got 'kl'; allowed: minmax, ema, percentile, mse"),
        ({"learn": "adaround"}, r"spec\.learn: got 'adaround'"),
        ({"granularity": "per_group"}, r"spec\.group_size: got None; allowed: a positive integer"),
        ({"group_size": 32}, r"spec\.group_size: got 32; allowed: null unless"),
        ({"granularity": "per_token"}, r"spec\.dynamic: got False; allowed: true when"),
        ({"dynamic": True, "learn": "lsq"}, r"spec\.learn: got 'lsq'; allowed: none when dynamic"),
        ({"learn": "lsq_plus"}, r"spec\.learn: got 'lsq_plus'; allowed: lsq_plus only with"),
        ({"scale_dtype": "bf16"}, r"spec\.scale_dtype: got 'bf16'; allowed: fp32, fp16"),
        ({"momentum": 1.5}, r"spec\.momentum: got 1\.5"),
        ({"percentile": 10}, r"spec\.percentile: got 10"),
        ({"symmetric": "yes"}, r"spec\.symmetric: got 'yes'; allowed: true or false"),
    ],
)
def test_invalid_specs_name_field_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_role_and_shape_errors():
    with pytest.raises(ValueError, match=r"granularity: got 'per_token'.*per_channel, per_group"):
        FakeQuantizer(QuantSpec(granularity="per_token", dynamic=True), role="weight")
    with pytest.raises(ValueError, match=r"learn: got 'pact'; allowed: none, lsq, lsq_plus"):
        FakeQuantizer(QuantSpec(learn="pact"), role="weight", shape=(4, 4))
    with pytest.raises(
        ValueError, match=r"group_size: got 32; allowed: a divisor of the input size 48"
    ):
        FakeQuantizer(
            QuantSpec(granularity="per_group", group_size=32), role="weight", shape=(4, 48)
        )
    with pytest.raises(ValueError, match=r"granularity: got 'per_channel'.*activations"):
        FakeQuantizer(QuantSpec(granularity="per_channel"), role="input")
    with pytest.raises(ValueError, match=r"rules\[1\]\.weight\.bitz: got 'bitz'"):
        QuantSpec.from_dict({"bitz": 4}, path="rules[1].weight")


@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile", "mse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_observers_refuse_non_finite_input(observer, bad):
    fq = FakeQuantizer(QuantSpec(observer=observer), role="input", name="fc.input_quant")
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(NonFiniteInputError, match=r"fc\.input_quant got (NaN|Inf) input"):
        fq(x)
    assert not bool(fq.calibrated)


def test_ema_minmax_and_percentile_aggregation():
    ema = FakeQuantizer(QuantSpec(observer="ema", momentum=0.5), role="input")
    ema(torch.tensor([-1.0, 1.0]))
    ema(torch.tensor([-3.0, 3.0]))
    assert ema.observer.max_val.item() == pytest.approx(2.0)
    mm = FakeQuantizer(QuantSpec(observer="minmax"), role="input")
    mm(torch.tensor([-1.0, 5.0]))
    mm(torch.tensor([-3.0, 3.0]))
    assert (mm.observer.min_val.item(), mm.observer.max_val.item()) == (-3.0, 5.0)
    pc = FakeQuantizer(QuantSpec(observer="percentile", percentile=99.0), role="input")
    x = torch.arange(1, 1001, dtype=torch.float32)
    pc(x)
    assert pc.observer.max_val.item() == 990.0  # the 99th percentile of |x|, outlier clipped


def test_weight_observer_tracks_the_current_weight():
    fq = FakeQuantizer(QuantSpec(granularity="per_channel"), role="weight", shape=(2, 3))
    fq(torch.ones(2, 3) * 10)
    fq(torch.ones(2, 3))
    assert fq.observer.max_val.tolist() == [1.0, 1.0]


def test_mse_observer_clips_outliers_and_beats_minmax():
    torch.manual_seed(0)
    x = torch.randn(4, 4096)
    x[:, 0] = 40.0
    errs = {}
    for obs in ("minmax", "mse"):
        fq = FakeQuantizer(
            QuantSpec(bits=4, granularity="per_channel", observer=obs), role="weight", shape=x.shape
        )
        errs[obs] = (fq(x) - x).pow(2).mean().item()
    assert errs["mse"] < 0.5 * errs["minmax"]
