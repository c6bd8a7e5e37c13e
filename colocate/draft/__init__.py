"""Draft models and their training objective (Eagle3 first)."""

from colocate.draft.arch import DraftArch
from colocate.draft.eagle3 import Eagle3Draft
from colocate.draft.loss import (
    UnrollResult,
    eagle3_unroll,
    label_counts,
    target_distribution,
)

__all__ = ["DraftArch", "Eagle3Draft", "UnrollResult", "eagle3_unroll",
           "label_counts", "target_distribution"]
