"""The benchmark scripts' own evaluation code, on synthetic features (the scripts themselves need the real data)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def fmnist_knn():
    spec = importlib.util.spec_from_file_location("fmnist_knn", BENCHMARKS / "fmnist_knn.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def separable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes, each a one-hot direction scaled by 5 plus unit noise in 16 dimensions: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat(n_per_class)
    feats = torch.randn(len(labels), 16, generator=g) * 0.3
    feats[torch.arange(len(labels)), labels] += 5.0
    return feats, labels


def test_fmnist_knn_probes_k20_and_several_label_draws(fmnist_knn):
    train, train_labels = separable(80, seed=0)
    test, test_labels = separable(20, seed=1)
    result = fmnist_knn.probe_features(train, train_labels, test, test_labels)
    assert result["knn_k"] == 20  # the table's header says k=20, whatever the eval API's default is
    assert result["knn_top1"] == 1.0
    draws = result["linear_top1_600_draws"]
    assert len(draws) == fmnist_knn.LINEAR_DRAWS >= 3
    assert result["linear_seeds"] == list(range(fmnist_knn.LINEAR_DRAWS))
    assert min(draws) >= 0.99
    assert result["linear_top1_600"] == pytest.approx(statistics.fmean(draws))
    assert result["linear_top1_600_std"] == pytest.approx(statistics.stdev(draws))
    assert result["num_labels_linear"] == 600


def test_fmnist_knn_linear_column_marks_single_draw_results(fmnist_knn):
    new = {"linear_top1_600": 0.8, "linear_top1_600_std": 0.0125, "linear_top1_600_draws": [0.79, 0.81]}
    assert fmnist_knn._linear(new) == "80.00% ± 1.25"
    old = {"linear_top1_600": 0.7845}
    assert fmnist_knn._linear(old) == "78.45% (seed 0 only)"
