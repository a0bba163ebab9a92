"""An SAE's code in sparse form, ``(values, indices)`` of each row's nonzeros, and back:
what ``SparseDictionary.encode_sparse`` and ``decode_sparse`` compute."""

from __future__ import annotations

import torch
from torch import Tensor

from aecore import ops
from aecore.errors import DataError, ShapeError


def encode_sparse(model, x: Tensor) -> tuple[Tensor, Tensor]:
    z = model.encode(x)
    finite = torch.isfinite(z).all(1)
    if not bool(finite.all()):  # a NaN counts as a nonzero: every latent would be kept
        from aecore.detection import row_list

        raise DataError(
            f"encode_sparse: x holds NaN or infinite values (rows "
            f"{row_list((~finite).cpu().numpy())}); drop or impute them first"
        )
    m = max(int((z != 0).sum(1).max()) if len(z) else 0, 1)
    values, indices = z.topk(m, dim=1)
    return values, indices


def decode_sparse(model, values: Tensor, indices: Tensor) -> Tensor:
    if values.shape != indices.shape or values.dim() != 2:
        raise ShapeError(
            f"decode_sparse expects values and indices of one shape (B, m); got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if indices.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        indices = indices.long()  # what numpy and other libraries hand over as often
    # the op checks the indices (an error naming the range, not torch's)
    out = ops.sparse_decode(values.to(model.W_dec.dtype), indices, model.W_dec, model.b_dec)
    return out / model.input_scale
