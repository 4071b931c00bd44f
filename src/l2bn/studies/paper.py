"""What the paper reports, for the study pages to print beside our measurements (labelled as the paper's).

Source: Wang et al., "L2BN: Enhancing Batch Normalization by Equalizing the L2 Norms of Features",
arXiv:2207.02625. The numbers of its tables (CIFAR-100) could not be read on this machine: no copy of the
paper's text or of its tables was reachable (searched: arXiv abstract pages, paperswithcode, OpenReview, the
authors' ASC_L2BN repository, whose README gives only the acoustic-scene accuracies). Every cell is therefore
``None`` and printed as "not available" — never a guess. What the abstract does state is the direction of
L2BN's effect against BN, which the pages compare our directions with.
"""
from __future__ import annotations

__all__ = ["PAPER_CLAIM", "PAPER_ROWS", "PAPER_SOURCE"]

PAPER_SOURCE = "Wang et al., arXiv:2207.02625"

# The abstract's claims for L2BN against BN: "more compact intra-class features" (smaller intra-angle),
# "enlarge the discrepancy of inter-class features" (larger inter-angle; with both, a smaller IIR), and
# "boost the generalization ability" (higher test accuracy). +1: L2BN's value is larger, -1: smaller.
PAPER_CLAIM: dict[str, int] = {
    "acc": +1, "intra_train": -1, "intra_test": -1, "inter": +1, "iir_train": -1, "iir_test": -1,
}

_METRICS = ("acc", "intra_train", "intra_test", "inter", "iir_train", "iir_test")


def _rows(*labels: str) -> list[tuple[str, dict[str, float | None]]]:
    return [(label, dict.fromkeys(_METRICS)) for label in labels]


# The paper's CIFAR-100 rows that correspond to each study (label, metric -> value or None).
PAPER_ROWS: dict[str, list[tuple[str, dict[str, float | None]]]] = {
    "table1": _rows("ResNet-56 BN", "ResNet-56 L2BN", "ResNet-110 BN", "ResNet-110 L2BN"),
    "norms": _rows("BN", "L2BN", "LN", "IN", "GN", "SN", "BCN", "BIN", "LN+BN", "IN+BN", "PN+BN", "UBN"),
    "placement": _rows("none (BN everywhere)", "classifier", "stage 1", "stages 2-3", "all"),
}
PAPER_ROWS["curves"] = PAPER_ROWS["table1"]
