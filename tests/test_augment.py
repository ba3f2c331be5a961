"""Training augmentation: speed perturbation against a float64 resampling, SpecAugment-style masking (bands inside the
real frames, set to the utterance's mean), each seeded by an utterance key."""
import numpy as np
import pytest
import torch

from steermoe.augment import MAX_TIME_FRACTION, spec_augment, speed_factors, speed_perturb, utterance_generator


def keyed(n, step=3, seed=0):
    return [utterance_generator(seed, step, f"utt-{b}") for b in range(n)]


def batch(lengths=(300, 137, 64), n_mels=80):
    torch.manual_seed(0)
    features = torch.randn(len(lengths), n_mels, max(lengths))
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return features, mask


def test_masks_are_bands_of_the_utterance_mean_inside_its_real_frames():
    features, mask = batch()
    out = spec_augment(features, mask, time_masks=2, time_width=40, freq_masks=2, freq_width=15,
                       generators=keyed(3))
    changed = out != features
    assert changed.any()
    for b, length in enumerate(mask.sum(1).tolist()):
        real = features[b, :, :length]
        mean = real.mean()
        assert torch.allclose(out[b][changed[b]], mean.expand(int(changed[b].sum())))
        assert torch.equal(out[b, :, length:], features[b, :, length:])          # padding untouched
        time_hit = changed[b].all(0)[:length]                                      # whole columns: time masks
        freq_hit = changed[b, :, :length].all(1)                                   # whole rows: frequency masks
        # everything changed is explained by a masked column or a masked row
        explained = time_hit[None, :] | freq_hit[:, None]
        assert torch.equal(changed[b, :, :length], explained)
        assert 0 < int(freq_hit.sum()) <= 2 * 15
        assert int(time_hit.sum()) <= 2 * min(40, int(length * MAX_TIME_FRACTION))


def test_an_utterances_masks_depend_on_its_key_and_length_only():
    features, mask = batch()
    kw = dict(time_masks=2, time_width=30, freq_masks=2, freq_width=10)
    a = spec_augment(features, mask, generators=keyed(3, step=5), **kw)
    b = spec_augment(features, mask, generators=keyed(3, step=5), **kw)
    c = spec_augment(features, mask, generators=keyed(3, step=6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the second utterance alone, unpadded: the same masks as inside the padded batch
    alone = spec_augment(features[1:2, :, :137], mask[1:2, :137], generators=keyed(3, step=5)[1:2], **kw)
    assert torch.equal(alone[0] != features[1, :, :137], a[1, :, :137] != features[1, :, :137])
    torch.testing.assert_close(alone[0], a[1, :, :137])          # the mean: a sum over other padding, same terms


def test_widths_are_drawn_up_to_their_limits_over_many_draws():
    features, mask = batch(lengths=(1000,))
    seen_time, seen_freq = set(), set()
    for key in range(300):
        out = spec_augment(features, mask, time_masks=1, time_width=7, freq_masks=1, freq_width=5,
                           generators=[utterance_generator(0, key, "u")])
        changed = out != features
        seen_time.add(int(changed[0].all(0).sum()))
        seen_freq.add(int(changed[0].all(1).sum()))
    assert seen_time == set(range(8)) and seen_freq == set(range(6))


def test_nothing_to_mask_returns_the_features_and_bad_arguments_are_named():
    features, mask = batch()
    assert spec_augment(features, mask) is features
    assert spec_augment(features, mask, time_masks=3, freq_width=4) is features
    with pytest.raises(ValueError, match="time_width must be an int >= 0"):
        spec_augment(features, mask, time_masks=1, time_width=-1)
    with pytest.raises(ValueError, match="features must be"):
        spec_augment(features[0], mask, time_masks=1, time_width=2)
    with pytest.raises(ValueError, match="one generator per utterance"):
        spec_augment(features, mask, time_masks=1, time_width=2, generators=keyed(2))


def test_half_precision_features_get_a_finite_mean():
    """The mean is summed in fp32: 3000 frames × 80 bins overflow an fp16 count."""
    features = torch.full((1, 80, 3000), 0.5, dtype=torch.float16)
    out = spec_augment(features, time_masks=2, time_width=50, freq_masks=2, freq_width=10, generators=keyed(1))
    changed = out != features
    assert not changed.any() and torch.isfinite(out).all()         # masked to the mean, 0.5 itself
    features[0, :, 1500:] = -0.5
    out = spec_augment(features, time_masks=2, time_width=50, freq_masks=2, freq_width=10, generators=keyed(1))
    assert (out != features).any() and torch.isfinite(out).all() and (out[out != features] == 0).all()


def resampled64(row: np.ndarray, new_length: int) -> np.ndarray:
    """Float64 linear resampling to ``new_length`` samples, sample centres aligned (half-pixel), ends held."""
    n = len(row)
    where = (np.arange(new_length) + 0.5) * n / new_length - 0.5
    return np.interp(where, np.arange(n), row.astype(np.float64))


def test_speed_perturb_matches_a_float64_resampling_and_pads_with_zeros():
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1001, 517, 0, 64])
    waveforms = torch.randn(4, 1001, generator=generator)
    waveforms[torch.arange(1001)[None, :] >= lengths[:, None]] = 0
    factors = [0.9, 1.13, 1.05, 1.0]
    out, new = speed_perturb(waveforms, lengths, factors)
    expected = [round(1001 / 0.9), round(517 / 1.13), 0, 64]
    assert new.tolist() == expected and new.dtype == lengths.dtype and out.shape == (4, max(expected))
    for b, m in enumerate(expected):
        if m:
            ref = resampled64(waveforms[b, :lengths[b]].numpy(), m)
            np.testing.assert_allclose(out[b, :m].double().numpy(), ref, rtol=0, atol=1e-5)
        assert not out[b, m:].any()
    assert torch.equal(out[3, :64], waveforms[3, :64])                          # factor 1: the same samples


def test_a_faster_tone_is_shorter_and_higher():
    t = np.arange(16000) / 16000.0
    tone = torch.tensor(np.sin(2 * np.pi * 440.0 * t), dtype=torch.float32)[None]
    out, new = speed_perturb(tone, torch.tensor([16000]), [1.1])
    assert int(new) == round(16000 / 1.1)
    crossings = int((np.diff(np.sign(out[0, :int(new)].numpy())) != 0).sum())
    cycles_per_second = crossings / 2 / (int(new) / 16000.0)
    assert cycles_per_second == pytest.approx(484.0, abs=2.0)


def test_slowing_stops_at_max_samples_and_bad_arguments_are_named():
    waveforms, lengths = torch.ones(2, 200), torch.tensor([100, 200])
    _, new = speed_perturb(waveforms, lengths, [0.5, 0.8], max_samples=150)
    assert new.tolist() == [150, 200]                      # filled to the limit; already past it: not slowed
    with pytest.raises(ValueError, match="waveforms must be"):
        speed_perturb(waveforms[0], lengths, [1.0, 1.0])
    with pytest.raises(ValueError, match="lengths must be"):
        speed_perturb(waveforms, lengths[:1], [1.0, 1.0])
    with pytest.raises(ValueError, match="factors must be 2 numbers > 0"):
        speed_perturb(waveforms, lengths, [1.0, 0.0])


def test_speed_factors_are_uniform_in_the_range_and_keyed():
    factors = speed_factors(0.1, [utterance_generator(0, step, "u") for step in range(400)])
    assert all(0.9 <= f <= 1.1 for f in factors)
    assert min(factors) < 0.91 and max(factors) > 1.09 and abs(np.mean(factors) - 1.0) < 0.01
    assert speed_factors(0.1, keyed(3)) == speed_factors(0.1, keyed(3)) != speed_factors(0.1, keyed(3, step=4))
    assert speed_factors(0.0, keyed(2)) == [1.0, 1.0]
    for bad in (0.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="perturb must be a number in"):
            speed_factors(bad, keyed(1))
