"""Label-noise review: find chips whose label disagrees with the imagery and with the model.

Three independent views of each chip are compared: the label, the MNDWI water index of the raw
Sentinel-2 reflectance and the model's (preferably out-of-sample) water probability.

* `signals`: `ReviewChip`, `noise_terms` and `noise_score`, the suspicion that one chip's label is wrong;
* `ranking`: `review_table` streams a split chip by chip into a ranked table, `top_k_scores` scores the
  ranking against chips with known injected noise;
* `widget` and `maps`: the review map of notebook 04 and its standalone HTML twin; decisions go to the
  store's review ledger (`workbench.data.ledger`), and raw against label-corrected metrics are computed by
  `workbench.evaluate.chips.label_corrected_table`.

The agreement numbers and the water-index pre-filter the review builds on live in
`workbench.data.agreement`, where the data audit uses them too.
"""

from workbench.data.ledger import DECISIONS
from workbench.review.ranking import (
    iter_store_chips,
    rank_by_score,
    resolve_top_k,
    review_row,
    review_table,
    top_k_scores,
)
from workbench.review.signals import SCORE_COLUMNS, ReviewChip, noise_score, noise_terms, noise_terms_from_masks

__all__ = [
    "DECISIONS",
    "SCORE_COLUMNS",
    "ReviewChip",
    "iter_store_chips",
    "noise_score",
    "noise_terms",
    "noise_terms_from_masks",
    "rank_by_score",
    "resolve_top_k",
    "review_row",
    "review_table",
    "top_k_scores",
]
