"""Named data sources and the train/val/test split.

``load_data(source)`` understands:

* ``digits`` / ``digits:image``: scikit-learn's bundled 8x8 digits as (N, 64) / (N, 1, 8, 8)
* ``npy:PATH``: memory-mapped, so data larger than RAM streams from disk
* ``npz:PATH[:KEY]``: memory-mapped when the archive is uncompressed (``np.savez``)
* ``csv:PATH``: numeric CSV, an optional header row
* ``idx:PATH[:LABELS]``: MNIST / Fashion-MNIST IDX files, gzipped or not
* ``patches``: 8x8 patches of scikit-learn's sample images (Ng's sparse-coding exercise)

Everything returns a ``Dataset`` of rows; normalisation is fitted on the training rows
only and applied lazily, batch by batch.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aecore.errors import DataError
from aecore.normalization import Normalization

_SCAN_BYTES = 32 * 2**20  # bytes read per pass when scanning memory-mapped data


@dataclass
class Dataset:
    """Rows ``x`` (N, *shape), maybe a memory map, optional integer ``labels``."""

    x: np.ndarray
    labels: np.ndarray | None
    source: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)


def load_data(source: str, *, check_finite: bool = True) -> Dataset:
    """Load a named data source (see the module docstring)."""
    if not isinstance(source, str) or not source:
        raise DataError(f"data source must be a non-empty string such as 'digits'; got {source!r}")
    kind, _, rest = source.partition(":")
    loaders = {
        "digits": _digits,
        "npy": _npy,
        "npz": _npz,
        "csv": _csv,
        "idx": _idx,
        "patches": _patches,
    }
    if kind not in loaders:
        raise DataError(
            f"unknown data source {source!r}: expected one of digits, digits:image, npy:PATH, "
            f"npz:PATH[:KEY], csv:PATH, idx:PATH[:LABELS], patches"
        )
    x, labels = loaders[kind](rest)
    return as_dataset(x, labels, source, check_finite=check_finite)


def as_dataset(x: Any, labels=None, source: str = "array", *, check_finite: bool = True) -> Dataset:
    """Validate an array of rows and wrap it."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise DataError(
                f"{source}: cannot convert {type(x).__name__} to an array: {exc}"
            ) from None
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: expected numeric data; got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(
            f"{source}: expected an array of rows (N, features...) with at least 2 axes; "
            f"got shape {x.shape}"
        )
    if x.shape[0] == 0 or 0 in x.shape[1:]:
        raise DataError(f"{source}: the data is empty (shape {x.shape})")
    if check_finite and x.dtype.kind == "f":
        check_all_finite(x, source)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],):
            raise DataError(
                f"{source}: expected one label per row ({x.shape[0]}); got labels of shape "
                f"{labels.shape}"
            )
    return Dataset(x, labels, source)


def check_all_finite(x: np.ndarray, source: str) -> None:
    """Raise a DataError naming the first NaN/inf (row and feature index)."""
    n = len(x)
    chunk = max(1, _SCAN_BYTES // max(1, x[:1].nbytes))
    for start in range(0, n, chunk):
        block = np.asarray(x[start : start + chunk])
        bad = ~np.isfinite(block)
        if bad.any():
            where = np.argwhere(bad)[0]
            row = start + int(where[0])
            index = tuple(int(i) for i in where[1:])
            value = block[tuple(where)]
            count = int(bad.sum())
            raise DataError(
                f"{source}: {value} at row {row}, feature {index if len(index) > 1 else index[0]}"
                f" ({count} non-finite value{'s' if count > 1 else ''} in rows "
                f"{start}-{start + len(block) - 1}); clean or impute the data first"
            )


def _existing(path: str, what: str) -> Path:
    if not path:
        raise DataError(f"{what}: a path is required, e.g. {what}:data/train.{what}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what}: file not found: {p}")
    if p.is_dir():
        raise DataError(f"{what}: expected a file, got a directory: {p}")
    return p


# -- sources -----------------------------------------------------------------------
def _digits(rest: str):
    from sklearn.datasets import load_digits

    if rest not in ("", "image", "vector"):
        raise DataError(f"digits: expected 'digits' or 'digits:image'; got 'digits:{rest}'")
    bunch = load_digits()
    x = bunch.data.astype(np.float32)
    if rest == "image":
        x = x.reshape(-1, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


def _npy(rest: str):
    p = _existing(rest, "npy")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False), None
    except ValueError as exc:
        raise DataError(f"npy: {p} is not a plain numeric .npy array ({exc})") from None
    except Exception as exc:
        raise DataError(f"npy: cannot read {p}: {exc}") from None


def _npz(rest: str):
    path, _, key = (
        rest.rpartition(":") if rest.count(":") and not Path(rest).exists() else (rest, "", "")
    )
    p = _existing(path, "npz")
    try:
        archive = zipfile.ZipFile(p)
    except zipfile.BadZipFile:
        raise DataError(f"npz: {p} is not an .npz archive (not a zip file)") from None
    with archive:
        members = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        if not members:
            raise DataError(f"npz: {p} holds no arrays")
        if not key:
            if len(members) > 1 and "x" not in members:
                raise DataError(
                    f"npz: {p} holds several arrays ({', '.join(members)}); choose one with "
                    f"npz:{p}:KEY"
                )
            key = "x" if "x" in members else members[0]
        if key not in members:
            raise DataError(f"npz: no array {key!r} in {p}; it holds {', '.join(members)}")
        info = archive.getinfo(key + ".npy")
        mapped = _memmap_stored_member(p, archive, info)
        if mapped is not None:
            return mapped, None
        with archive.open(info) as f:
            try:
                return np.lib.format.read_array(io.BufferedReader(f), allow_pickle=False), None
            except ValueError as exc:
                raise DataError(f"npz: {p}:{key} is not a plain numeric array ({exc})") from None


def _memmap_stored_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    """Memory-map an uncompressed member of an .npz (np.savez stores members raw)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError:
            return None
        if dtype.hasobject:
            raise DataError(f"npz: {path} holds an object array; only numeric data is read")
        offset = f.tell()
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def _csv(rest: str):
    p = _existing(rest, "csv")
    rows: list[list[float]] = []
    width = None
    # utf-8-sig: a byte-order mark would otherwise make the first row look like a header
    with open(p, newline="", encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            cells = [c.strip() for c in line.split(",")]
            try:
                values = [float(c) for c in cells]
            except ValueError:
                if lineno == 1 and not rows:
                    continue  # a header row
                bad = next(c for c in cells if not _is_float(c))
                raise DataError(
                    f"csv: {p} line {lineno}: non-numeric value {bad!r}; every cell after the "
                    f"header must be a number"
                ) from None
            if width is None:
                width = len(values)
            elif len(values) != width:
                raise DataError(f"csv: {p} line {lineno}: {len(values)} columns, expected {width}")
            rows.append(values)
    if not rows:
        raise DataError(f"csv: {p} holds no data rows")
    return np.asarray(rows, dtype=np.float32), None


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not. Plain files are memory-mapped."""
    p = _existing(str(path), "idx")
    with open(p, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        try:
            with gzip.open(p, "rb") as f:
                raw = f.read()
        except (OSError, EOFError) as exc:
            raise DataError(f"idx: {p} is a damaged gzip file ({exc})") from None
        header_src = raw
    else:
        raw = None
        with open(p, "rb") as f:
            header_src = f.read(4 + 4 * 255)
    if len(header_src) < 4 or header_src[0] != 0 or header_src[1] != 0:
        raise DataError(
            f"idx: {p} is not an IDX file: wrong magic number {header_src[:4].hex() or 'empty'} "
            f"(expected 0000 then a type byte and the number of axes, e.g. 00000803)"
        )
    type_code, ndim = header_src[2], header_src[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"idx: {p} has unknown IDX element type 0x{type_code:02x}")
    if ndim == 0 or len(header_src) < 4 + 4 * ndim:
        raise DataError(f"idx: {p} is truncated: the header is incomplete")
    shape = tuple(int.from_bytes(header_src[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    size = len(raw) - offset if raw is not None else p.stat().st_size - offset
    if size < expected:
        raise DataError(
            f"idx: {p} is truncated: the header promises shape {shape} ({expected} bytes of data) "
            f"but the file holds {size}"
        )
    if raw is not None:
        return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(
            shape
        )
    return np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=shape)


def _idx(rest: str):
    images, labels = rest, None
    if ":" in rest and not Path(rest).exists():
        images, _, labels_path = rest.rpartition(":")
        labels = read_idx(labels_path)
        if labels.ndim != 1:
            raise DataError(f"idx: labels file {labels_path} must be 1-D; got shape {labels.shape}")
    x = read_idx(images)
    if x.ndim == 1:
        raise DataError(f"idx: {images} is 1-D (a labels file?); expected images (N, H, W)")
    if x.ndim == 3:  # (N, H, W) grey images -> (N, 1, H, W)
        x = x.reshape(x.shape[0], 1, *x.shape[1:])
    if labels is not None and len(labels) != len(x):
        raise DataError(f"idx: {len(x)} images but {len(labels)} labels")
    return x, labels


def _patches(rest: str):
    n = 10000
    if rest:
        try:
            n = int(rest)
        except ValueError:
            raise DataError(f"patches: expected patches[:COUNT]; got 'patches:{rest}'") from None
        if n < 1:
            raise DataError(f"patches: COUNT must be positive; got {n}")
    return sample_patches(n), None


def whiten(image: np.ndarray, cutoff: float = 0.2) -> np.ndarray:
    """Olshausen & Field's (1996) whitening of a grey image: flatten the 1/f amplitude
    spectrum of natural images (multiply by f) and roll off high frequencies
    (``exp(-(f/cutoff)^4)``, ``cutoff`` in cycles per pixel), then unit variance. The
    default cutoff is half Olshausen's: the sample images are JPEGs whose block
    artefacts a higher cutoff amplifies into checkerboard filters."""
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    spectrum = np.fft.fft2(image - image.mean()) * f * np.exp(-((f / cutoff) ** 4))
    out = np.real(np.fft.ifft2(spectrum))
    return out / out.std()


def sample_patches(n: int = 10000, size: int = 8, seed: int = 0) -> np.ndarray:
    """Random ``size``x``size`` patches of scikit-learn's sample images, prepared as for
    Ng's sparse autoencoder exercise: his IMAGES were whitened natural scenes, so the
    grey images are whitened first (``whiten``); then each patch loses its mean, is
    truncated to +-3 standard deviations and squashed to [0.1, 0.9]. Returns
    (n, size*size) float32."""
    from sklearn.datasets import load_sample_images

    images = [whiten(img.astype(np.float64).mean(axis=2)) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size * size))
    which = rng.integers(len(images), size=n)
    for i, k in enumerate(which):
        img = images[k]
        r = rng.integers(img.shape[0] - size + 1)
        c = rng.integers(img.shape[1] - size + 1)
        out[i] = img[r : r + size, c : c + size].ravel()
    out -= out.mean(axis=1, keepdims=True)
    limit = 3 * out.std()
    out = np.clip(out, -limit, limit) / limit
    return ((out + 1) * 0.4 + 0.1).astype(np.float32)


# -- split and normalised views ----------------------------------------------------
@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_indices(
    n: int, *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> Split:
    """A seeded random split of ``n`` rows; each index array is sorted (memory maps read
    forward)."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1); got {f}")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be < 1; got {val_fraction} + {test_fraction}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise DataError(f"{n} rows are too few to split into train/val/test")
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return Split(np.sort(train), np.sort(val), np.sort(test))


class ArrayView:
    """Rows ``x[indices]`` of a (maybe memory-mapped) array, normalised on access.

    Indexing with an int or an index array reads only those rows, so a view of data
    larger than RAM costs nothing until a batch is drawn.
    """

    def __init__(
        self,
        x: np.ndarray,
        indices: np.ndarray | None = None,
        normalization: Normalization | None = None,
        *,
        raw: bool = False,
    ) -> None:
        self.x = x
        self.indices = np.arange(len(x)) if indices is None else np.asarray(indices)
        self.normalization = normalization or Normalization("none")
        self.raw = raw  # rows as stored (dtype kept), e.g. to fit a normalisation

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.x.shape[1:])

    def __getitem__(self, item) -> np.ndarray:
        rows = self.indices[item]
        if np.ndim(rows) == 0:
            row = np.asarray(self.x[int(rows)])
            return row if self.raw else self.normalization.apply(row[None])[0]
        order = np.argsort(rows, kind="stable")  # read memory maps forward
        block = np.asarray(self.x[rows[order]])
        if self.raw:
            out = np.empty_like(block)
            out[order] = block
            return out
        out = np.empty_like(block, dtype=np.float32)
        out[order] = self.normalization.apply(block)
        return out

    def to_numpy(self) -> np.ndarray:
        return self[np.arange(len(self))]
