"""Per-class k-NN accuracy on Fashion-MNIST test: raw pixels against the frozen features of pre-trained runs.

The same k-NN as benchmarks/fmnist_knn.py (k=20, temperature 0.07, all 60,000 training labels), with the
predictions split by class, and for each run how often it agrees with raw pixels and how often at least one of
the two is right:

    .venv/bin/python benchmarks/fmnist_per_class.py runs/bench_fmnist_knn_run3/moby/pretrain ...
"""

from __future__ import annotations

import argparse

import torch
from fmnist_knn import EvalData, benchmark_knn_scores, raw_pixel_sets

from selfsight.checkpoint import load_run_backbone
from selfsight.config import DEFAULT_DATA_DIR
from selfsight.eval.features import extract_features

CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def knn_predictions(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor) -> torch.Tensor:
    return benchmark_knn_scores(train_feats, train_labels, test_feats, len(CLASSES)).argmax(1)


def row(name: str, pred: torch.Tensor, labels: torch.Tensor) -> str:
    per_class = [100 * (pred[labels == c] == c).float().mean().item() for c in range(len(CLASSES))]
    overall = 100 * (pred == labels).float().mean().item()
    return f"| {name} | {overall:.2f} | " + " | ".join(f"{a:.1f}" for a in per_class) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="pre-training run directories")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    data = EvalData(args.data_dir)
    train_raw, train_labels, test_raw, test_labels = raw_pixel_sets(data, in_chans=1)
    raw = knn_predictions(train_raw, train_labels, test_raw)
    lines = ["| features | all | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 2) + "|",
             row("raw pixels", raw, test_labels)]
    notes = []
    for run in args.runs:
        backbone, info = load_run_backbone(run)
        train_set, test_set = data.get(backbone.in_chans, backbone.img_size)
        feats, labels = extract_features(backbone, train_set, info["mean"], info["std"], device=torch.device("cpu"))
        test_feats, _ = extract_features(backbone, test_set, info["mean"], info["std"], device=torch.device("cpu"))
        pred = knn_predictions(feats, labels, test_feats)
        lines.append(row(run, pred, test_labels))
        agree = 100 * (pred == raw).float().mean()
        either = 100 * ((pred == test_labels) | (raw == test_labels)).float().mean()
        notes.append(f"{run}: agrees with raw pixels on {agree:.2f}% of the test images; it or raw pixels right on "
                     f"{either:.2f}%")
    print("\n".join(lines + [""] + notes))


if __name__ == "__main__":
    main()
