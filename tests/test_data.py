"""Data sources, splits, normalisation, and their error messages."""

import gzip
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aecore.data import ArrayView, Normalization, load_data, prepare, split_indices
from aecore.data.files import read_idx
from aecore.data.sources import source_columns
from aecore.errors import DataError


def write_idx(path, array, magic_type=0x08, gz=False):
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(">u1" if magic_type == 0x08 else ">f4").tobytes()
    if gz:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def test_digits_as_vectors_and_images():
    vec, img = load_data("digits"), load_data("digits:image")
    assert vec.x.shape == (1797, 64) and img.x.shape == (1797, 1, 8, 8)
    assert vec.labels.shape == (1797,) and vec.x.max() == 16
    np.testing.assert_array_equal(vec.x, img.x.reshape(1797, 64))


def test_npy_is_memory_mapped(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(60, dtype=np.float32).reshape(20, 3))
    ds = load_data(f"npy:{tmp_path / 'a.npy'}")
    assert isinstance(ds.x, np.memmap) and ds.x.shape == (20, 3)


def test_npz_uncompressed_member_is_memory_mapped_and_keys_are_chosen(tmp_path):
    x = np.random.default_rng(0).random((30, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, other=np.zeros((2, 2)))
    ds = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert isinstance(ds.x, np.memmap)
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(load_data(f"npz:{tmp_path / 'd.npz'}:other").x, np.zeros((2, 2)))
    np.savez_compressed(tmp_path / "c.npz", data=x)
    np.testing.assert_array_equal(load_data(f"npz:{tmp_path / 'c.npz'}").x, x)
    with pytest.raises(DataError, match=r"no array 'nope' in .*d\.npz; it holds x, other"):
        load_data(f"npz:{tmp_path / 'd.npz'}:nope")
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(DataError, match=r"holds several arrays \(a, b\); choose one"):
        load_data(f"npz:{tmp_path / 'two.npz'}")


def test_csv_with_header(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,c\n1,2,3\n4,5,6\n")
    np.testing.assert_array_equal(load_data(f"csv:{tmp_path / 'd.csv'}").x, [[1, 2, 3], [4, 5, 6]])
    # its first row was taken for a header and the error named line 2
    (tmp_path / "s.csv").write_text("1;2;3\n4;5;6\n")
    with pytest.raises(DataError, match=r"s\.csv separates values by ';', not commas \(line 1"):
        load_data(f"csv:{tmp_path / 's.csv'}")
    (tmp_path / "t.csv").write_text("a\tb\n1\t2\n")
    with pytest.raises(DataError, match=r"separates values by '\\t', not commas"):
        load_data(f"csv:{tmp_path / 't.csv'}")
    (tmp_path / "d.csv").write_text("1,5;2;3\n4;5;6\n")  # decimal commas
    with pytest.raises(DataError, match="value '5;2;3'.*separates values by ';': save it with"):
        load_data(f"csv:{tmp_path / 'd.csv'}")
    # a trailing comma on every line was "non-numeric value ''; every cell after the header"
    (tmp_path / "e.csv").write_text("1,2,3,,\n4,5,6,,\n")
    with pytest.raises(DataError, match=r"line 1: column 4 is empty \(the line ends with a comma"):
        load_data(f"csv:{tmp_path / 'e.csv'}")
    # a header of numbers (years, sensor ids) was read as a data row without a word
    (tmp_path / "n.csv").write_text("2019,2020,2021\n1.5,2,3\n4,5,6.5\n")
    with pytest.warns(UserWarning, match=r"first row \(2019,2020,2021\) is integers .*:header"):
        assert load_data(f"csv:{tmp_path / 'n.csv'}").x.shape == (3, 3)
    assert load_data(f"csv:{tmp_path / 'n.csv'}:header").x.tolist() == [[1.5, 2, 3], [4, 5, 6.5]]
    assert source_columns(f"csv:{tmp_path / 'n.csv'}:header") == ["2019", "2020", "2021"]
    with warnings.catch_warnings():  # said to be data: read so, without the warning
        warnings.simplefilter("error")
        assert load_data(f"csv:{tmp_path / 'n.csv'}:noheader").x.shape == (3, 3)
    assert source_columns(f"csv:{tmp_path / 'n.csv'}:noheader") is None
    # pandas' header for unnamed columns (DataFrame(X).to_csv(index=False)) was a data row
    (tmp_path / "p.csv").write_text("0,1,2\n1,2,3\n4,5,6\n")
    np.testing.assert_array_equal(load_data(f"csv:{tmp_path / 'p.csv'}").x, [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 255, (5, 4, 3)).astype(np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    ip = write_idx(tmp_path / f"img-idx3-ubyte{suffix}", images, gz=gz)
    lp = write_idx(tmp_path / f"lab-idx1-ubyte{suffix}", labels, gz=gz)
    ds = load_data(f"idx:{ip}:{lp}")
    assert ds.x.shape == (5, 1, 4, 3)
    np.testing.assert_array_equal(ds.x[:, 0], images)
    np.testing.assert_array_equal(ds.labels, labels)


def test_idx_float_type(tmp_path):
    arr = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(read_idx(write_idx(tmp_path / "f.idx", arr, magic_type=0x0D)), arr)


def test_patches_are_normalised_like_ngs_exercise():
    x = load_data("patches:500").x
    assert x.shape == (500, 64)
    assert x.min() >= 0.1 - 1e-6 and x.max() <= 0.9 + 1e-6


# -- bad data: one clear line each ---------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"npy: file not found: .*nothere\.npy"):
        load_data(f"npy:{tmp_path / 'nothere.npy'}")


def test_unknown_source():
    with pytest.raises(DataError, match=r"unknown data source 'mnist'.*expected one of digits"):
        load_data("mnist")


def test_idx_wrong_magic(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"\x12\x34\x08\x03" + b"\0" * 20)
    with pytest.raises(DataError, match=r"is not an IDX file: wrong magic number 12340803"):
        load_data(f"idx:{tmp_path / 'x.idx'}")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    p = write_idx(tmp_path / "t.idx", np.zeros((10, 4, 4), np.uint8))
    payload = p.read_bytes()[:-30]
    p.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(
        DataError, match=r"is truncated: the header promises shape \(10, 4, 4\) \(160 bytes"
    ):
        load_data(f"idx:{p}")


def test_nan_is_located(tmp_path):
    x = np.ones((7, 3), np.float32)
    x[5, 2] = np.nan
    np.save(tmp_path / "n.npy", x)
    with pytest.raises(DataError, match=r"nan at row 5, feature 2 \(1 non-finite value"):
        load_data(f"npy:{tmp_path / 'n.npy'}")


def test_inf_in_image_is_located(tmp_path):
    x = np.ones((4, 1, 2, 2), np.float32)
    x[3, 0, 1, 0] = -np.inf
    np.save(tmp_path / "i.npy", x)
    with pytest.raises(DataError, match=r"-inf at row 3, feature \(0, 1, 0\)"):
        load_data(f"npy:{tmp_path / 'i.npy'}")


def test_a_csv_with_pandas_index_or_a_header_of_wavelengths_reads_its_data(tmp_path):
    # df.to_csv(path) writes the index as a first column under an empty header cell: it
    # became a feature (named ''); a header of wavelengths became a data row
    from aecore.data.sources import source_columns

    (tmp_path / "i.csv").write_text(",a,b\n0,1.5,2\n1,3,4\n2,5,6\n")
    np.testing.assert_array_equal(
        load_data(f"csv:{tmp_path / 'i.csv'}").x, [[1.5, 2], [3, 4], [5, 6]]
    )
    assert source_columns(f"csv:{tmp_path / 'i.csv'}") == ["a", "b"]
    nm = ",".join(str(400 + 10 * i) for i in range(16))
    values = ",".join(["0.5"] * 16)
    (tmp_path / "w.csv").write_text(f"{nm}\n{values}\n{values}\n")
    assert load_data(f"csv:{tmp_path / 'w.csv'}").x.shape == (2, 16)
    # uneven, or a short ramp: data, said to be read so (":header" if not)
    (tmp_path / "d.csv").write_text(f"{nm.replace('550', '551')}\n{values}\n")
    (tmp_path / "r.csv").write_text("10,20,30,40\n0.5,0.5,0.5,0.5\n")
    for name in ("d.csv", "r.csv"):
        with pytest.warns(UserWarning, match="is integers where the next is not: read as data"):
            assert len(load_data(f"csv:{tmp_path / name}").x) == 2
    (tmp_path / "n.csv").write_text(f"{nm}\n{nm}\n")  # integer rows below: data
    assert load_data(f"csv:{tmp_path / 'n.csv'}").x.shape == (2, 16)
    # a model of an older version, which trained on the index, keeps it
    from aecore.data.files import csv_header, read_csv

    assert csv_header(tmp_path / "i.csv", ["", "a", "b"]) == ["", "a", "b"]
    assert read_csv(str(tmp_path / "i.csv"), ["", "a", "b"]).shape == (3, 3)


def test_a_binary_file_read_as_csv_is_named_in_a_short_message(tmp_path):
    # the whole binary "cell" (262 KB of NUL bytes) went into the one-line error
    np.save(tmp_path / "x.npy", np.zeros((300, 100)))
    with pytest.raises(DataError, match=r"characters\); .*\(the file is binary") as raised:
        load_data(f"csv:{tmp_path / 'x.npy'}")
    assert len(str(raised.value)) < 1000  # not the 240,000 characters of the cell


def test_non_numeric_csv(tmp_path):
    (tmp_path / "b.csv").write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(DataError, match=r"line 3: non-numeric value 'oops'"):
        load_data(f"csv:{tmp_path / 'b.csv'}")


def test_ragged_csv(tmp_path):
    (tmp_path / "r.csv").write_text("1,2\n3\n")
    with pytest.raises(DataError, match=r"line 2: 1 columns, expected 2"):
        load_data(f"csv:{tmp_path / 'r.csv'}")


def test_empty_array(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 5), np.float32))
    with pytest.raises(DataError, match=r"the data is empty \(shape \(0, 5\)\)"):
        load_data(f"npy:{tmp_path / 'e.npy'}")


def test_one_dimensional_array(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(5, np.float32))
    with pytest.raises(
        DataError, match=r"expected an array of rows \(N, features...\).*got shape \(5,\)"
    ):
        load_data(f"npy:{tmp_path / 'v.npy'}")


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a plain numeric .npy array"):
        load_data(f"npy:{tmp_path / 'o.npy'}")


def test_not_a_zip(tmp_path):
    (tmp_path / "z.npz").write_bytes(b"hello")
    with pytest.raises(DataError, match="is not an .npz archive"):
        load_data(f"npz:{tmp_path / 'z.npz'}")
    assert zipfile  # the module under test reads zip archives directly


# -- split and normalisation -----------------------------------------------------------
@given(st.integers(10, 500), st.integers(0, 10**6))
def test_split_is_a_seeded_partition(n, seed):
    s = split_indices(n, val_fraction=0.1, test_fraction=0.2, seed=seed)
    joined = np.concatenate([s.train, s.val, s.test])
    assert sorted(joined.tolist()) == list(range(n))
    again = split_indices(n, val_fraction=0.1, test_fraction=0.2, seed=seed)
    assert all(
        np.array_equal(a, b)
        for a, b in zip((s.train, s.val, s.test), (again.train, again.val, again.test))
    )


def test_split_rejects_bad_fractions():
    with pytest.raises(DataError, match=r"val_fraction \+ test_fraction must be < 1"):
        split_indices(10, val_fraction=0.5, test_fraction=0.5)


@given(
    hnp.arrays(
        np.float64, st.tuples(st.integers(2, 30), st.integers(1, 6)), elements=st.floats(-1e3, 1e3)
    ),
    st.sampled_from(["minmax", "standardize"]),
    st.booleans(),
)
@example(np.array([[5e-324], [0.0]]), "minmax", False)  # a subnormal spread: constant
def test_normalization_round_trips(x, kind, per_feature):
    norm = Normalization.fit(kind, x, per_feature=per_feature)
    y = norm.apply(x)
    np.testing.assert_allclose(norm.invert(y), x, rtol=1e-4, atol=1e-2)
    if kind == "minmax":
        assert y.min() >= -1e-5 and y.max() <= 1 + 1e-5
    assert Normalization.from_dict(norm.to_dict()) == norm


def test_data_units_tell_unit_interval_intensities_one_scale_and_units_of_their_own():
    from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine

    from aecore.data.units import INTENSITY, OWN, SHARED, UNIT, data_units

    digits = load_digits(return_X_y=True)[0]
    assert data_units(digits / 16.0) == UNIT
    assert data_units(digits) == INTENSITY  # pixel counts 0..16, mostly reaching 0
    assert data_units(load_iris(return_X_y=True)[0]) == SHARED  # lengths in cm
    for table in (load_wine, load_breast_cancer):
        assert data_units(table(return_X_y=True)[0]) == OWN
    # the same table with one feature in other units is still in units of its own, and
    # rows seen through a view (a memory map's split) count as the array does
    wine = load_wine(return_X_y=True)[0]
    assert data_units(wine * np.r_[1000.0, np.ones(12)]) == OWN
    # one feature in a larger unit among many, or one of two, would dominate one scale
    rng = np.random.default_rng(0)
    many = rng.normal(size=(100, 20))
    assert data_units(many) == SHARED
    many[:, 3] *= 1e4
    assert data_units(many) == OWN
    assert data_units(rng.normal(size=(100, 2)) * [1.0, 1e6]) == OWN
    assert data_units(rng.normal(size=(100, 1)) * 1e6) == SHARED  # nothing to weigh against
    # nor one in a far smaller unit (farads beside volts), which one scale would erase
    many[:, 3] /= 1e4
    many[:, 5] *= 1e-13
    assert data_units(many) == OWN
    # but a faint residue in an empty pixel leaves intensities intensities
    faint = digits * 16.0
    faint[:, 0] = np.random.default_rng(1).random(len(faint)) * 0.02
    assert data_units(faint) == INTENSITY
    # a year beside pixel counts varies as little, but its offset would set one scale
    # from 0 to 2024 and squash the pixels into [0, 0.008]: nothing trained
    years = np.random.default_rng(2).integers(2015, 2025, len(digits))
    assert data_units(np.column_stack([digits, years])) == OWN
    assert data_units(np.column_stack([digits, years - 2015])) == INTENSITY

    assert data_units(np.full((5, 3), 7.0)) == SHARED  # nothing varies: nothing to rescale
    # rows seen through a view (a memory map's split) count, not the whole array
    mixed = np.vstack([digits[:100, :13] / 16.0, wine])
    assert data_units(mixed) != UNIT
    assert data_units(ArrayView(mixed, np.arange(100), raw=True)) == UNIT


def test_a_feature_in_small_units_is_rescaled_not_taken_for_constant():
    # the cut-off was absolute (a spread below 1e-12): a capacitance in farads stayed
    # at 1e-13 after "standardising", and anomalies in it went unseen
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(size=50), 1e-13 * rng.normal(size=50), np.full(50, 7.0)])
    norm = Normalization.fit("standardize", x, per_feature=True)
    assert norm.scale[1] == pytest.approx(x[:, 1].std()) and norm.scale[2] == 0.0
    np.testing.assert_allclose(norm.apply(x)[:, 1].std(), 1.0, rtol=1e-5)


def test_normalization_is_fitted_on_train_rows_only():
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    s = split_indices(10, val_fraction=0.0, test_fraction=0.3, seed=0)
    norm = Normalization.fit("minmax", ArrayView(x, s.train))
    lo, hi = x[s.train].min(), x[s.train].max()
    assert norm.shift[0] == lo and norm.scale[0] == hi - lo


def test_array_view_reads_only_the_rows_asked(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "a.npy", x)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    view = ArrayView(mm, np.array([7, 2, 5]), Normalization("minmax", [0.0], [39.0]))
    np.testing.assert_allclose(view[np.array([2, 0])], x[[5, 7]] / 39.0)
    np.testing.assert_allclose(view[1], x[2] / 39.0)


def test_csv_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf1,2,3\n4,5,6\n")
    np.testing.assert_array_equal(
        load_data(f"csv:{tmp_path / 'bom.csv'}").x, [[1, 2, 3], [4, 5, 6]]
    )


@pytest.mark.parametrize("per_feature", [True, False])
def test_standardize_keeps_precision_far_from_zero(per_feature):
    x = 1e9 + np.random.default_rng(0).standard_normal((1000, 3))
    norm = Normalization.fit("standardize", x, per_feature=per_feature)
    y = (x - norm.shift) / norm.scale  # in float64, as fitted
    assert np.all(np.abs(y.std(0) - 1) < 0.05) and np.all(np.abs(y.mean()) < 0.05)


def test_prepare_fits_on_rows_as_stored_not_float32(tmp_path):
    x = 1e7 + np.random.default_rng(0).standard_normal((500, 2))
    np.save(tmp_path / "far.npy", x)
    data = prepare(f"npy:{tmp_path / 'far.npy'}", normalize="standardize")
    train = data.view("train").to_numpy()
    assert np.all(np.abs(train.std(0) - 1) < 0.05)


def test_values_beyond_float32_are_refused_when_loaded_or_normalised(tmp_path):
    # 1e300 trained "fine" (ratio 1.000) and then reconstructed as NaN
    import warnings

    from aecore.data.normalization import Normalization

    x = np.random.default_rng(0).random((50, 4))
    x[3, 1] = 1e300
    np.save(tmp_path / "big.npy", x)
    with pytest.raises(DataError, match=r"1e\+300 at row 3 is beyond float32's range"):
        load_data(f"npy:{tmp_path / 'big.npy'}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning on the way
        for kind in ("standardize", "minmax"):
            with pytest.raises(DataError, match="beyond float32"):
                Normalization.fit(kind, x)


def test_a_text_file_named_npy_is_not_called_a_pickle(tmp_path):
    (tmp_path / "t.npy").write_text("1,2,3\n")
    with pytest.raises(DataError, match="not a .npy file.*csv:PATH"):
        load_data(f"npy:{tmp_path / 't.npy'}")


def test_a_source_with_nothing_after_its_colon_is_refused():
    with pytest.raises(DataError, match=r"'digits:': nothing after ':' \(forms: digits"):
        load_data("digits:")


def test_a_csv_keeps_the_digits_of_a_feature_far_from_zero(tmp_path):
    # read as float32, a timestamp (1.7e9 + seconds) kept steps of 128 before normalising
    stamps = 1.7e9 + np.arange(6.0)
    np.savetxt(tmp_path / "t.csv", np.column_stack([stamps, stamps * 0]), delimiter=",")
    x = load_data(f"csv:{tmp_path / 't.csv'}").x
    assert x.dtype == np.float64 and len(np.unique(x[:, 0])) == 6


def test_rows_are_laid_out_for_a_model_only_where_the_layout_is_certain():
    from aecore.data.dataset import layout_hint, rows_in_shape

    flat, images = np.zeros((2, 12)), np.zeros((2, 3, 2, 2))
    assert rows_in_shape(flat, (3, 2, 2)).shape == (2, 3, 2, 2)
    assert rows_in_shape(images, (12,)).shape == (2, 12)
    # channels last for a vector model: flattened, its pixels would be scrambled
    last = np.zeros((2, 8, 8, 3))
    assert rows_in_shape(last, (192,)) is last
    assert layout_hint(last.shape, (3, 8, 8)) == "; channels come first: x.transpose(0, 3, 1, 2)"
    assert rows_in_shape(np.zeros((2, 5)), (3, 2, 2)).shape == (2, 5)  # not as many values
