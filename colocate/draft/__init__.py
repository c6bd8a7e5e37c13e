"""Draft models and their training objective (Eagle3 first)."""

from colocate.draft.arch import DraftArch
from colocate.draft.eagle3 import Eagle3Draft
from colocate.draft.recipe import DraftStepResult
from colocate.draft.loss import eagle3_unroll, label_counts
from colocate.draft.teacher import target_distribution

__all__ = ["DraftArch", "DraftStepResult", "Eagle3Draft", "eagle3_unroll",
           "label_counts", "target_distribution"]
