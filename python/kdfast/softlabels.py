"""Top-k soft labels under their historical import path, `kdfast.softlabels`.

`SoftLabels` and its dtype rules live in `kdfast.contract.softlabels`, their checks in
`kdfast.contract.validation`, and `compress_topk` in `kdfast.functional`; this module only
re-exports them so that `from kdfast.softlabels import ...` keeps working.
"""

from kdfast.contract.options import TAIL_MODES as SPARSE_TAIL_MODES
from kdfast.contract.softlabels import INDEX_DTYPES, LOGPROB_DTYPES, SoftLabels, smallest_index_dtype
from kdfast.contract.validation import check_compress_inputs, check_sparse_kd_inputs
from kdfast.functional.sparse import compress_topk

__all__ = [
    "INDEX_DTYPES",
    "LOGPROB_DTYPES",
    "SPARSE_TAIL_MODES",
    "SoftLabels",
    "check_compress_inputs",
    "check_sparse_kd_inputs",
    "compress_topk",
    "smallest_index_dtype",
]
