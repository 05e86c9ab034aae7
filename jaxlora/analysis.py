"""The LoRA paper's analysis tools (Hu et al. 2021, section 7): low-rank SVD, subspace similarity, amplification.

Layout. The paper writes W with shape (d, k) and the update as ΔW = B A with B (d, r), A (r, k); jaxlora stores
kernels as (in, out) and the update as ΔW = s · A @ B with A (in, r), B (r, out). Every function here is written
for the jaxlora layout and equals the paper's quantity for the transposed matrices.
"""

from jaxlora._src.analysis import (
    adapter_amplification_factor,
    amplification_factor,
    amplification_factors,
    low_rank_approximation,
    subspace_similarities,
    subspace_similarity,
)
from jaxlora._src.svd import top_singular

__all__ = [
    "adapter_amplification_factor",
    "amplification_factor",
    "amplification_factors",
    "low_rank_approximation",
    "subspace_similarities",
    "subspace_similarity",
    "top_singular",
]
