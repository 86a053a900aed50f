"""Few-label evaluation: k-NN and linear probe on frozen features, fine-tuning, low-label splits."""

from selfsight.eval.api import EvalConfig, evaluate
from selfsight.eval.features import extract_features
from selfsight.eval.finetune import FinetuneResult, finetune
from selfsight.eval.knn import knn_scores, top1
from selfsight.eval.linear import LinearProbeResult, fit_linear_probe, linear_probe
from selfsight.eval.splits import few_label_indices

__all__ = [
    "EvalConfig",
    "FinetuneResult",
    "LinearProbeResult",
    "evaluate",
    "extract_features",
    "few_label_indices",
    "finetune",
    "fit_linear_probe",
    "knn_scores",
    "linear_probe",
    "top1",
]
