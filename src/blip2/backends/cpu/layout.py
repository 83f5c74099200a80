"""Weight layouts, in plain torch: the row blocks kernels.c streams, and torch's int4pack format.

Block layout. A decode step reads every weight once, and kernels.c reads weights stored in small
row blocks as one sequential stream per thread (see its header). A blocked (N, K) weight keeps its
shape and dtype; its memory holds (N/R, K/C, R, C): blocks of R rows, each a run of C-column
chunks. int8 and bf16 weights are blocked with a reshape and a transpose (here); int4 weights
(uint8, two values a byte, in torch's int4pack format) with a C routine (kernels.py).

int4pack. Int4Linear stores its weight as torch's `_convert_weight_to_int4pack_for_cpu` does, so
that torch's own int4 kernel can read it where kernels.c cannot run; `to_int4pack` gives the same
bytes where torch lacks that op. Its (K/G, N, 2) scales and zeros are re-laid block by block while
the weight is blocked (`scales_blocked`), so that they stream alongside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

# dtype -> (rows per block, columns per chunk), as kernels.c lays them out. uint8 is int4 (two values
# a byte, Int4Linear's qweight): 64 rows, chunks of 8 values (4 bytes) per row.
BLOCK = {torch.int8: (8, 64), torch.bfloat16: (4, 32), torch.uint8: (64, 4)}
INT4_BLOCK_N = 64  # torch's int4pack format (and so the int4 block) groups output channels by 64


def block_for(dtype: torch.dtype, shape) -> tuple[int, int] | None:
    """The block a weight of this dtype and shape is laid out in: int8, bf16 or int4 (uint8), 2-D,
    a whole number of blocks; else None."""
    block = BLOCK.get(dtype)
    if block is None or len(shape) != 2 or shape[0] % block[0] or shape[1] % block[1]:
        return None
    return block


def fits(w: Tensor) -> bool:
    """w can be blocked here and now: a blockable dtype and shape, contiguous, on CPU."""
    return (block_for(w.dtype, w.shape) is not None and w.device.type == "cpu" and not w.is_meta
            and w.is_contiguous())


def blocks_of(w: Tensor, R: int, C: int) -> Tensor:
    """Row-major w (N, K) as a (N/R, K/C, R, C) view: the blocked order, not yet contiguous."""
    N, K = w.shape
    return w.view(N // R, R, K // C, C).transpose(1, 2)


# --- torch's int4pack format ---
def to_int4pack(q: Tensor) -> Tensor:
    """(N, K) ints in [0, 15] -> (N, K/2) uint8 in torch's int4pack layout (N a multiple of 64):
    each block of 64 rows is stored as K rows of 32 bytes; byte (k, j) holds row j's value in its
    low nibble and row 32+j's in its high nibble. Same bytes as _convert_weight_to_int4pack_for_cpu."""
    N, K = q.shape
    q = q.to(torch.uint8).reshape(N // INT4_BLOCK_N, 2, 32, K)  # (nb, hi/lo, j, K)
    b = q[:, 0] | (q[:, 1] << 4)  # (nb, 32, K)
    return b.transpose(1, 2).contiguous().reshape(N, K // 2)


def from_int4pack(p: Tensor) -> Tensor:
    """Inverse of to_int4pack: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    N, K = p.shape[0], p.shape[1] * 2
    b = p.reshape(N // INT4_BLOCK_N, K, 32).transpose(1, 2)  # (nb, 32, K)
    return torch.stack((b & 15, b >> 4), 1).reshape(N, K)


def scales_blocked(sz: Tensor) -> Tensor:
    """(K/G, N, 2) -> the same shape holding (N/64, K/G, 64, 2): each block of 64 rows' pairs together."""
    g, N = sz.shape[:2]
    return sz.view(g, N // INT4_BLOCK_N, INT4_BLOCK_N, 2).transpose(0, 1).contiguous().view(g, N, 2)


def scales_in_rows(sz: Tensor) -> Tensor:
    """Inverse of scales_blocked."""
    g, N = sz.shape[:2]
    return sz.view(N // INT4_BLOCK_N, g, INT4_BLOCK_N, 2).transpose(0, 1).contiguous().view(g, N, 2)
