"""The moving average of the trainable parameters: the recurrence, the swap, the state a checkpoint holds."""
import pytest
import torch

from steermoe.ema import ParameterEMA


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((3, 5), (7,), ())]


def test_averages_follow_the_recurrence_with_its_warm_up_in_float64():
    ps, decay = params(), 0.5
    ema = ParameterEMA(ps, decay)
    reference = [p.detach().double().clone() for p in ps]
    g = torch.Generator().manual_seed(1)
    rates = []
    for n in range(12):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=g))
        rates.append(ema.rate())
        keep = min(decay, (1 + n) / (10 + n))
        reference = [keep * r + (1 - keep) * p.detach().double() for r, p in zip(reference, ps)]
        ema.update()
        for avg, ref in zip(ema.averages, reference):
            torch.testing.assert_close(avg.double(), ref, rtol=1e-6, atol=1e-6)
    assert rates[:3] == pytest.approx([0.1, 2 / 11, 0.25]) and rates[-1] == decay
    assert ema.updates == 12


def test_swapped_holds_the_averages_inside_and_restores_the_trained_values_bit_for_bit():
    ps = params()
    ema = ParameterEMA(ps, 0.5)
    with torch.no_grad():
        for p in ps:
            p.mul_(3.0).add_(0.1)
    ema.update()
    trained = [p.detach().clone() for p in ps]
    with ema.swapped():
        for p, avg in zip(ps, ema.averages):
            assert torch.equal(p, avg)
        assert not all(torch.equal(p, t) for p, t in zip(ps, trained))
    assert all(torch.equal(p, t) for p, t in zip(ps, trained))
    with pytest.raises(RuntimeError, match="boom"), ema.swapped():      # restored on an error too
        raise RuntimeError("boom")
    assert all(torch.equal(p, t) for p, t in zip(ps, trained))


def test_a_checkpoint_of_the_averages_and_the_state_resumes_both():
    ps = params()
    ema = ParameterEMA(ps, 0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in ps:
                p.add_(1.0)
        ema.update()
    state = ema.state_dict()
    with ema.swapped():
        saved = [p.detach().clone() for p in ps]          # what a checkpoint's weights file holds
    resumed_params = params(seed=5)
    with torch.no_grad():
        for p, s in zip(resumed_params, saved):
            p.copy_(s)                                    # load_trainable of that checkpoint
    resumed = ParameterEMA(resumed_params, 0.9)
    resumed.load_state_dict(state)
    assert resumed.updates == 3 and resumed.rate() == ema.rate()
    assert all(torch.equal(a, b) for a, b in zip(resumed.averages, ema.averages))
    assert all(torch.equal(a, b) for a, b in zip(resumed_params, ps))
    with pytest.raises(ValueError, match="holds 2 tensors, this model trains 3"):
        resumed.load_state_dict({"updates": 1, "trained": state["trained"][:2]})
    with pytest.raises(ValueError, match=r"shape \(5, 3\) for a parameter of shape \(3, 5\)"):
        resumed.load_state_dict({"updates": 1, "trained": [state["trained"][0].t(), *state["trained"][1:]]})


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan")])
def test_a_decay_outside_zero_to_one_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        ParameterEMA(params(), decay)
