"""The bottom layer of kdfast: what every other layer agrees on.

Options (`KDOptions` and the mode names), the `SoftLabels` container and its dtype rules,
input validation and the row reductions of the loss contract. Nothing here imports another
part of kdfast or the compiled core; everything above may import from here.
"""

from kdfast.contract.options import COMBINE_MODES, DIVERGENCES, REDUCTIONS, TAIL_MODES, KDOptions, compute_dtype
from kdfast.contract.reductions import reduce_rows, reduction_scale
from kdfast.contract.softlabels import INDEX_DTYPES, LOGPROB_DTYPES, SoftLabels, smallest_index_dtype

__all__ = [
    "COMBINE_MODES",
    "DIVERGENCES",
    "INDEX_DTYPES",
    "LOGPROB_DTYPES",
    "REDUCTIONS",
    "TAIL_MODES",
    "KDOptions",
    "SoftLabels",
    "compute_dtype",
    "reduce_rows",
    "reduction_scale",
    "smallest_index_dtype",
]
