import numpy as np
import pytest
from data_helpers import reconstruct

from fat5.data import Denoiser, Mixture, denoise, max_piece_length, random_spans_noise_mask
from fat5.data.ul2 import example_lengths, span_counts

SENT = np.arange(1000, 1100)
MODES = {"[R]": 900, "[S]": 901, "[X]": 902}
ALL = list(Mixture.ul2().denoisers) + list(Mixture.t5().denoisers)


@pytest.mark.parametrize("den", ALL, ids=lambda d: d.name)
def test_reinserting_targets_reconstructs(den):
    rng = np.random.default_rng(0)
    mode = MODES.get(den.mode_token)
    for n in list(range(1, 40)) + list(rng.integers(40, 1200, 60)):
        n = min(int(n), max_piece_length(den, 10_000, 10_000, len(SENT)))
        toks = rng.integers(3, 800, n)
        inp, tgt = denoise(toks, den, rng, SENT, eos_id=1, mode_id=mode)
        assert (inp[0] == mode) == (mode is not None)
        assert reconstruct(inp, tgt, SENT.tolist(), set(MODES.values())) == toks.tolist()
        e, d, _ = example_lengths(den, n)
        assert len(inp) <= e and len(tgt) <= d
        if den.kind != "S":
            assert len(inp) == e and len(tgt) == d  # span corruption lengths are exact


@pytest.mark.parametrize("density,mean", [(0.15, 3), (0.15, 8), (0.5, 3), (0.15, 64), (0.5, 64)])
def test_noise_density_and_span_length(density, mean):
    rng = np.random.default_rng(1)
    noise = spans = total = 0
    for _ in range(300):
        n = int(rng.integers(200, 2000))
        m = random_spans_noise_mask(n, density, mean, rng)
        assert not m[0] and m[-1]  # T5 layout: starts with non-noise, ends with noise
        starts = np.count_nonzero(m[1:] & ~m[:-1])
        noise, spans, total = noise + m.sum(), spans + starts, total + n
        assert (m.sum(), starts) == span_counts(n, density, mean)
    assert abs(noise / total - density) < 0.005
    assert abs(noise / spans / mean - 1) < 0.05


def test_segments_are_random():
    rng = np.random.default_rng(2)
    masks = {random_spans_noise_mask(50, 0.3, 3, rng).tobytes() for _ in range(50)}
    assert len(masks) > 40


@pytest.mark.parametrize("den", ALL, ids=lambda d: d.name)
@pytest.mark.parametrize(
    "enc,dec,ns", [(512, 512, 100), (1024, 1024, 100), (512, 114, 100), (64, 16, 5), (7, 5, 2)]
)
def test_max_piece_length_fits_and_is_maximal(den, enc, dec, ns):
    n = max_piece_length(den, enc, dec, ns)

    def fits(k):
        e, d, s = example_lengths(den, k)
        return e <= enc and d <= dec and s <= ns

    assert all(fits(k) for k in range(1, n + 1)) and not fits(n + 1)
    rng = np.random.default_rng(3)
    for _ in range(20):
        k = int(rng.integers(1, n + 1))
        inp, tgt = denoise(rng.integers(3, 99, k), den, rng, SENT[:ns], 1, MODES.get(den.mode_token))
        assert len(inp) <= enc and len(tgt) <= dec


def test_mixture_config():
    m = Mixture.ul2()
    assert np.allclose(m.probabilities, [0.165, 0.165, 0.34] + [0.0825] * 4)
    assert Mixture.from_dict(m.to_dict()) == m
    t5 = Mixture.t5()
    assert len(t5.denoisers) == 1 and t5.denoisers[0].mode_token is None
    with pytest.raises(ValueError, match="kind"):
        Denoiser("Q")
    with pytest.raises(ValueError, match="2 denoisers but 1 weights"):
        Mixture((Denoiser("S"), Denoiser("R")), (1.0,))
    with pytest.raises(ValueError, match="unknown mixture keys"):
        Mixture.from_dict({"denoisers": [], "weight": []})
    with pytest.raises(ValueError, match="cannot hold even a one-token"):
        max_piece_length(Denoiser("R", mode_token="[R]"), 3, 2, 100)


def _replace_runs(tokens, mask, sentinels):
    # The spec, written the slow way: each run of True in mask becomes one sentinel, numbered in order.
    out, k = [], 0
    for i, (t, m) in enumerate(zip(tokens.tolist(), mask.tolist())):
        if not m:
            out.append(t)
        elif i == 0 or not mask[i - 1]:
            out.append(int(sentinels[k]))
            k += 1
    return out


@pytest.mark.parametrize("den", [d for d in ALL if d.kind != "S"], ids=lambda d: d.name)
def test_denoise_equals_mask_spec(den):
    # denoise builds span corruption straight from the run lengths; it must equal masking the piece with
    # random_spans_noise_mask (same draws) and replacing spans, as T5 does.
    rng = np.random.default_rng(4)
    for n in list(range(2, 30)) + list(rng.integers(30, 600, 40)):
        n = min(int(n), max_piece_length(den, 10_000, 10_000, len(SENT)))
        toks = rng.integers(3, 800, n)
        seed = int(rng.integers(1 << 30))
        mask = random_spans_noise_mask(n, den.noise_density, den.mean_span, np.random.default_rng(seed))
        inp, tgt = denoise(toks, den, np.random.default_rng(seed), SENT, eos_id=1, mode_id=7)
        assert inp.tolist() == [7] + _replace_runs(toks, mask, SENT) + [1]
        assert tgt.tolist() == _replace_runs(toks, ~mask, SENT) + [1]
