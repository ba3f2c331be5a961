"""SpecAugment-style masking: bands inside the real frames, set to the utterance's mean, seeded by a key."""
import pytest
import torch

from steermoe.augment import MAX_TIME_FRACTION, augment_generator, spec_augment


def batch(lengths=(300, 137, 64), n_mels=80):
    torch.manual_seed(0)
    features = torch.randn(len(lengths), n_mels, max(lengths))
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return features, mask


def test_masks_are_bands_of_the_utterance_mean_inside_its_real_frames():
    features, mask = batch()
    out = spec_augment(features, mask, time_masks=2, time_width=40, freq_masks=2, freq_width=15,
                       generator=augment_generator(0, 3))
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


def test_same_key_same_masks_other_key_other_masks():
    features, mask = batch()
    kw = dict(time_masks=2, time_width=30, freq_masks=2, freq_width=10)
    a = spec_augment(features, mask, generator=augment_generator(0, 5, 0, 1), **kw)
    b = spec_augment(features, mask, generator=augment_generator(0, 5, 0, 1), **kw)
    c = spec_augment(features, mask, generator=augment_generator(0, 6, 0, 1), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_widths_are_drawn_up_to_their_limits_over_many_draws():
    features, mask = batch(lengths=(1000,))
    seen_time, seen_freq = set(), set()
    for key in range(300):
        out = spec_augment(features, mask, time_masks=1, time_width=7, freq_masks=1, freq_width=5,
                           generator=augment_generator(key))
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
