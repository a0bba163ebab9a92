"""The superposition source: seeded, streamable rows with known ground truth, the
statistics it promises, and its data-source string."""

import functools
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aecore.data import load_data, prepare
from aecore.data import superposition as sp
from aecore.data.superposition import (
    CHUNK_ROWS,
    NOISE_ROWS,
    Superposition,
    parse_superposition,
    spread_directions,
    superposition_from_source,
)
from aecore.errors import DataError

SMALL = Superposition(d=16, n_features=64, p=0.05, noise=0.05, seed=7)


@functools.cache
def small_stream(rows: int = 150000) -> tuple[np.ndarray, np.ndarray]:
    """The first rows of SMALL's stream, made at once."""
    return SMALL.sample(rows)


def test_features_are_seeded_unit_norm_rows():
    spec = Superposition(d=32, n_features=100)
    f = spec.features()
    assert f.shape == (100, 32) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(f, Superposition(d=32, n_features=100).features())
    assert not np.allclose(f, Superposition(d=32, n_features=100, seed=1).features())
    f[0] = 0  # a copy: the generator's own directions are untouched
    assert np.linalg.norm(spec.features()[0]) > 0.99


def test_rows_are_the_same_made_at_once_or_in_pieces():
    x, acts = small_stream()
    assert x.shape == (150000, 16) and acts.shape == (150000, 64)
    assert x.dtype == acts.dtype == np.float32
    # pieces with odd boundaries, across chunks and noise blocks, from a cold cache
    bounds = [0, 1, NOISE_ROWS + 3, CHUNK_ROWS - 1, CHUNK_ROWS + 2, 2 * CHUNK_ROWS + 7, 150000]
    sp._chunk.cache_clear()
    pieces = [SMALL.sample(b - a, start=a) for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), acts)
    sp._chunk.cache_clear()
    np.testing.assert_array_equal(SMALL.inputs(150000), x)
    sp._chunk.cache_clear()
    np.testing.assert_array_equal(SMALL.sample(150000)[0], x)  # deterministic


@given(st.lists(st.integers(0, 150000 - 1), min_size=1, max_size=40))
def test_rows_at_any_positions_are_those_rows_of_the_stream(indices):
    x, acts = SMALL.sample_at(indices)
    np.testing.assert_array_equal(x, small_stream()[0][indices])
    np.testing.assert_array_equal(acts, small_stream()[1][indices])


def test_x_is_the_activations_times_the_features_plus_noise():
    clean = Superposition(d=16, n_features=64, p=0.05, seed=7)
    x, acts = clean.sample(5000)
    np.testing.assert_allclose(x, acts @ clean.features(), atol=1e-5)
    noisy, noisy_acts = SMALL.sample(5000)
    np.testing.assert_array_equal(noisy_acts, acts)  # noise draws from its own stream
    residual = noisy - acts @ SMALL.features()
    assert abs(residual.std() - 0.05) < 0.002 and abs(residual.mean()) < 0.002


def test_features_fire_with_probability_p():
    spec = Superposition(d=8, n_features=200, p=0.02, seed=3)
    acts = spec.sample(50000, start=123)[1]
    rate = (acts != 0).mean()
    sigma = math.sqrt(0.02 * 0.98 / acts.size)
    assert abs(rate - 0.02) < 5 * sigma
    # per-feature probabilities, 0 and 1 included
    p = np.linspace(0, 1, 21)
    acts = Superposition(d=4, n_features=21, p=tuple(p)).sample(20000)[1]
    rates = (acts != 0).mean(axis=0)
    assert rates[0] == 0 and rates[-1] == 1
    np.testing.assert_allclose(rates, p, atol=5 * math.sqrt(0.25 / 20000))
    # features fire independently: pairwise co-firing matches the product of rates
    both = ((acts[:, 5] != 0) & (acts[:, 10] != 0)).mean()
    assert abs(both - p[5] * p[10]) < 0.015


@pytest.mark.parametrize("std", [0.0, 0.2, 0.5, 1.0])
def test_magnitudes_follow_a_folded_normal(std):
    acts = Superposition(d=4, n_features=50, p=0.1, magnitude_std=std).sample(20000)[1]
    m = acts[acts != 0].astype(np.float64)
    assert m.min() > 0
    if std == 0:
        np.testing.assert_array_equal(m, 1.0)
        return
    # |N(1, std^2)|: mean std*sqrt(2/pi)*exp(-1/(2 std^2)) + (1 - 2 Phi(-1/std)), E m^2 = 1 + std^2
    mean = std * math.sqrt(2 / math.pi) * math.exp(-1 / (2 * std**2)) + math.erf(
        1 / (std * math.sqrt(2))
    )
    spread = math.sqrt(1 + std**2 - mean**2)
    tolerance = 5 * spread / math.sqrt(len(m))
    assert abs(m.mean() - mean) < tolerance
    assert abs(m.std() - spread) < 5 * tolerance


def test_spreading_reduces_overlaps():
    rng = np.random.default_rng(0)
    few = spread_directions(rng.standard_normal((24, 32)), 100)
    gram = few @ few.T - np.eye(24)
    assert np.abs(gram).max() < 1e-3  # n <= d: orthogonal
    many = rng.standard_normal((256, 32))
    many /= np.linalg.norm(many, axis=1, keepdims=True)
    before = np.abs(many @ many.T - np.eye(256)).max()
    after_rows = spread_directions(many, 100)
    after = np.abs(after_rows @ after_rows.T - np.eye(256)).max()
    assert after < 0.75 * before
    np.testing.assert_allclose(np.linalg.norm(after_rows, axis=1), 1.0, atol=1e-12)
    spec = Superposition(d=32, n_features=24, spread_steps=100)
    f = spec.features().astype(np.float64)
    assert np.abs(f @ f.T - np.eye(24)).max() < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d": 0}, "d must be an integer >= 1; got 0"),
        ({"n_features": 2.5}, "n_features must be an integer"),
        ({"p": 1.5}, r"p must lie in \[0, 1\]; got 1.5"),
        ({"p": (0.1, 0.2)}, r"one probability per feature \(1024\); got 2"),
        ({"p": "often"}, "p must be a probability or one per feature"),
        ({"magnitude_std": -1.0}, "magnitude_std must be a finite number >= 0"),
        ({"noise": float("nan")}, "noise must be a finite number >= 0"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"spread_steps": True}, "spread_steps must be an integer"),
    ],
)
def test_bad_arguments_say_what_was_expected(kwargs, message):
    with pytest.raises(DataError, match=message):
        Superposition(**kwargs)


def test_bad_row_requests():
    with pytest.raises(DataError, match="rows must be an integer >= 0; got -1"):
        SMALL.sample(-1)
    with pytest.raises(DataError, match="start must be an integer"):
        SMALL.sample(3, start=1.5)
    with pytest.raises(DataError, match="1-d array of integer row indices"):
        SMALL.sample_at([[1, 2]])
    with pytest.raises(DataError, match="row indices must be >= 0; got -4"):
        SMALL.sample_at([3, -4])
    x, acts = SMALL.sample(0)
    assert x.shape == (0, 16) and acts.shape == (0, 64)


def test_per_feature_probabilities_keep_the_spec_hashable():
    a = Superposition(d=4, n_features=3, p=np.array([0.1, 0.2, 0.3]))
    assert a.p == (0.1, 0.2, 0.3) and hash(a) == hash(Superposition(d=4, n_features=3, p=a.p))
    np.testing.assert_array_equal(a.probabilities(), [0.1, 0.2, 0.3])


# -- the data-source string -----------------------------------------------------------------
def test_source_string_sets_every_field():
    rows, spec = parse_superposition("100000,d=64,n=512,p=0.02,std=0.5,seed=3,noise=0.1,spread=2")
    assert rows == 100000
    assert spec == Superposition(
        d=64, n_features=512, p=0.02, magnitude_std=0.5, noise=0.1, seed=3, spread_steps=2
    )
    assert parse_superposition("") == (100000, Superposition())
    assert parse_superposition("d=8, n=16") == (100000, Superposition(d=8, n_features=16))
    assert parse_superposition("250") == (250, Superposition())


def test_load_data_makes_the_streams_first_rows():
    ds = load_data("superposition:1000,d=16,n=32")
    assert ds.x.shape == (1000, 16) and ds.x.dtype == np.float32 and ds.labels is None
    np.testing.assert_array_equal(ds.x, Superposition(d=16, n_features=32).sample(1000)[0])


def test_the_truth_comes_back_from_a_prepared_record():
    prepared = prepare("superposition:600,d=8,n=12,p=0.1,seed=5")
    truth = superposition_from_source(prepared.record["source"])
    assert truth == Superposition(d=8, n_features=12, p=0.1, seed=5)
    test_rows = prepared.split.test
    np.testing.assert_array_equal(truth.sample_at(test_rows)[0], prepared.dataset.x[test_rows])
    assert superposition_from_source("digits") is None
    assert superposition_from_source("npy:superposition.npy") is None


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("superposition:ten", r"expected superposition\[:ROWS\]\[,KEY=VALUE...\] .*'ten'"),
        ("superposition:0", "ROWS must be a positive integer; got 0"),
        ("superposition:10,dims=4", "unknown key 'dims'; expected one of d, n, p, std, noise"),
        ("superposition:10,d=four", "d must be an integer; got 'four'"),
        ("superposition:10,p=often", "p must be a number; got 'often'"),
        ("superposition:10,p=2", r"p must lie in \[0, 1\]; got 2.0"),
        ("superposition:10,d", "expected KEY=VALUE .*got 'd'"),
        ("superposition:10,d=4,d=5", "key 'd' is given twice"),
        ("superposition:10,n=0", "n_features must be an integer >= 1; got 0"),
    ],
)
def test_bad_source_strings_say_what_was_expected(source, message):
    with pytest.raises(DataError, match=message) as info:
        load_data(source)
    assert str(info.value).startswith(source.partition(",")[0])


def test_the_source_is_listed_among_the_forms():
    with pytest.raises(DataError, match=r"superposition\[:ROWS\]"):
        load_data("superpositions:10")


def test_works_without_torch():
    script = textwrap.dedent(
        """
        import sys

        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked by the test")

        sys.meta_path.insert(0, _NoTorch())
        from aecore.data import load_data
        from aecore.data.superposition import superposition_from_source

        assert load_data("superposition:50,d=4,n=8").x.shape == (50, 4)
        assert superposition_from_source("superposition:50,d=4").d == 4
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
