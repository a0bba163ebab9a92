"""Data: named sources and file readers, the seeded split, normalisation fitted on the
training rows, and ``prepare`` which does all three. numpy only (no torch), so the
torch-free runtime shares the normalisation and the readers."""

from aecore.data.dataset import Dataset, as_dataset, check_all_finite
from aecore.data.files import read_idx
from aecore.data.images import sample_patches, whiten
from aecore.data.normalization import Normalization
from aecore.data.prepare import Prepared, prepare, prepare_like
from aecore.data.sources import load_data
from aecore.data.split import ArrayView, Split, split_indices

__all__ = [
    "ArrayView",
    "Dataset",
    "Normalization",
    "Prepared",
    "Split",
    "as_dataset",
    "check_all_finite",
    "load_data",
    "prepare",
    "prepare_like",
    "read_idx",
    "sample_patches",
    "split_indices",
    "whiten",
]
