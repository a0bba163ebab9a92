"""Readers of data files: ``.npy`` / ``.npz`` (memory-mapped where the format allows),
numeric ``.csv`` and IDX (the MNIST format, gzipped or not). Each returns an array of
rows and, where the file has them, labels; errors name the file and what is wrong."""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from aecore.errors import DataError, warn


def existing_file(path: str, what: str) -> Path:
    """``path`` as a Path to an existing file; ``what`` names the format in errors."""
    if not path:
        raise DataError(f"{what}: a path is required, e.g. {what}:data/train.{what}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what}: file not found: {p}")
    if p.is_dir():
        raise DataError(f"{what}: expected a file, got a directory: {p}")
    return p


def read_npy(path: str) -> np.ndarray:
    """A ``.npy`` array, memory-mapped (data larger than RAM streams from disk)."""
    p = existing_file(path, "npy")
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":  # numpy would call any other file a pickle
        raise DataError(
            f"npy: {p} is not a .npy file (it does not start with numpy's header); save "
            f"arrays with numpy.save, or name a text file as csv:PATH"
        )
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"npy: {p} is not a plain numeric .npy array ({exc})") from None
    except Exception as exc:
        raise DataError(f"npy: cannot read {p}: {exc}") from None


def read_npz(spec: str) -> np.ndarray:
    """``PATH[:KEY]`` of an ``.npz``: memory-mapped when stored uncompressed (np.savez);
    without a key, the array ``x`` or the only one."""
    rest = spec
    path, _, key = (
        rest.rpartition(":") if rest.count(":") and not Path(rest).exists() else (rest, "", "")
    )
    p = existing_file(path, "npz")
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
            return mapped
        with archive.open(info) as f:
            try:
                return np.lib.format.read_array(io.BufferedReader(f), allow_pickle=False)
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


def csv_source(rest: str) -> tuple[str, bool | None]:
    """The path and header choice of a ``csv:PATH[:header|:noheader]`` source: the first
    row is the header (numbers too: years, sensor ids), or data, or else guessed."""
    for suffix, header in ((":header", True), (":noheader", False)):
        if rest.endswith(suffix):
            return rest[: -len(suffix)], header
    return rest, None


def read_csv(path: str, names: list[str] | None = None, header: bool | None = None) -> np.ndarray:
    """A numeric CSV as float64 rows (a timestamp keeps its digits until normalised),
    after a header row if the first row is one (``header``, or None: ``_is_header``'s
    guess). A header whose first cell is empty is pandas' ``to_csv`` with its index: that
    column is the index, not data, and is dropped (unless ``names``, a model's columns,
    include it)."""
    p = existing_file(path, "csv")
    rows: list[list[float]] = []
    width = None
    # utf-8-sig: a byte-order mark would otherwise make the first row look like a header
    first, skip = True, 0
    top = _first_rows(p)
    _check_separator(p, top)
    following = (top[1:] or [None])[0]
    with open(p, newline="", encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if first and header is not False and (header or _is_header(line, names, following)):
                first, skip = False, int(_indexed(_header_cells(line), names))
                continue
            if first and header is None:
                _warn_if_header_of_numbers(p, line, following)
            first = False
            cells = [c.strip() for c in line.split(",")][skip:]
            try:
                values = [float(c) for c in cells]
            except ValueError:
                bad = next(c for c in cells if not _is_float(c))
                if bad == "":
                    raise DataError(_empty_cell(p, lineno, line, cells, skip)) from None
                other = next((d for d in (";", "\t", "|") if d in bad), None)
                hint = f" (the file separates values by {other!r}: save it with commas)"
                hint = hint if other else ""
                if "\x00" in bad or "\ufffd" in bad:
                    hint = " (the file is binary, not text: is it a .npy or another format?)"
                shown = repr(bad) if len(bad) <= 60 else f"{bad[:60]!r}... ({len(bad)} characters)"
                raise DataError(
                    f"csv: {p} line {lineno}: non-numeric value {shown}; every cell but a "
                    f"header's must be a number{hint}"
                ) from None
            if width is None:
                width = len(values)
            elif len(values) != width:
                raise DataError(f"csv: {p} line {lineno}: {len(values)} columns, expected {width}")
            rows.append(values)
    if not rows:
        raise DataError(f"csv: {p} holds no data rows")
    return np.asarray(rows, dtype=np.float64)


def _check_separator(path: Path, top: list[str]) -> None:
    """A file whose first lines separate values by another character than a comma
    would otherwise be read as one column, or its first row taken for a header."""
    if not top or any("," in line for line in top):
        return
    for other in (";", "\t", "|"):
        if all(other in line for line in top):
            raise DataError(
                f"csv: {path} separates values by {other!r}, not commas (line 1: "
                f"{top[0][:60]!r}): save it with commas"
            )


def _empty_cell(path: Path, lineno: int, line: str, cells: list[str], skip: int) -> str:
    first = cells.index("")
    column = first + 1 + skip
    if line.endswith(",") and not any(cells[first:]):  # every cell from there on empty
        why = "the line ends with a comma: remove the trailing separators"
    else:
        why = "a missing value: fill it in or drop the row"
    return f"csv: {path} line {lineno}: column {column} is empty ({why})"


def _warn_if_header_of_numbers(path: Path, line: str, following: str | None) -> None:
    """A first row of integers above rows that are not may be a header of numbers (years,
    sensor ids): read as data, it would add a row and shift every output row."""
    cells = line.split(",")
    if len(cells) < 2 or not _integers(cells) or not following:
        return
    if _integers(following.split(",")):
        return
    warn(
        f"csv: {path}: its first row ({line[:40]}) is integers where the next is not: read "
        f"as data. Name the source csv:{path}:header if it is a header, :noheader if not "
        f"(an --input file: drop the row, or save the rows as .npy)",
        UserWarning,
    )


def csv_header(
    path: str | Path, names: list[str] | None = None, header: bool | None = None
) -> list[str] | None:
    """The column names of a CSV's header row (``read_csv``'s rule), or None."""
    rows = _first_rows(Path(path))
    following = rows[1] if len(rows) > 1 else None
    if not rows or header is False or not (header or _is_header(rows[0], names, following)):
        return None
    cells = _header_cells(rows[0])
    return cells[1:] if _indexed(cells, names) else cells


def _first_rows(path: Path, count: int = 2) -> list[str]:
    """The first ``count`` non-empty lines (what a header is told apart by)."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                rows.append(line.strip())
                if len(rows) == count:
                    break
    return rows


#: the fewest columns of evenly spaced integers read as a header of wavelengths
WAVELENGTH_COLUMNS = 16


def _indexed(header: list[str], names: list[str] | None = None) -> bool:
    """pandas writes its index as a first column whose header cell is empty (kept where
    ``names``, a model's columns, include it: older versions trained on it)."""
    return len(header) > 1 and header[0] == "" and not (names and names[0] == "")


def _is_header(line: str, names: list[str] | None, following: str | None = None) -> bool:
    """Whether a CSV's first row is its header: it names the columns ``names`` (a
    model's, which may be numbers), it is pandas' header for unnamed columns (0, 1, ...,
    n - 1, from three columns on: a data row so is unlikely), it is evenly spaced integers
    (wavelengths) above a ``following`` row that is not all integers, or no cell of it is
    a number (a first data row with one missing cell is not a header, and is refused as
    such)."""
    cells = _header_cells(line)
    if names is not None and cells == list(names):
        return True
    if len(cells) >= 3 and cells == [str(i) for i in range(len(cells))]:
        return True
    # (many columns: a short data row may be evenly spaced integers; a spectrum's header
    # of wavelengths runs to hundreds)
    if len(cells) >= WAVELENGTH_COLUMNS and _integers(cells) and following:
        steps = {int(b) - int(a) for a, b in zip(cells, cells[1:])}
        if len(steps) == 1 and steps != {0} and not _integers(following.split(",")):
            return True
    return not any(_is_float(c) for c in cells)


def _integers(cells: list[str]) -> bool:
    return all(c.strip().lstrip("-").isdigit() for c in cells)


def _header_cells(line: str) -> list[str]:
    """A header row's names, quoted ones (holding commas) included."""
    import csv

    return [c.strip() for c in next(csv.reader([line.strip()]))]


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
    p = existing_file(str(path), "idx")
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


def read_idx_images(spec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``IMAGES[:LABELS]`` IDX files: images (N, 1, H, W) (grey) and optional labels."""
    rest = spec
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
