"""Diagnostics after Xie et al. 2022, "Revealing the Dark Secrets of Masked Image Modeling": attention
distance, entropy and head diversity, linear CKA between layers and runs, reconstructions, embedding maps."""

from selfsight.diagnostics.api import diagnose
from selfsight.diagnostics.attention import (
    attention_distance,
    attention_entropy,
    attention_stats,
    capture_attention,
    head_diversity,
    patch_attention,
    patch_coords,
)
from selfsight.diagnostics.cka import cka_matrix, layer_features, linear_cka
from selfsight.diagnostics.embedding import pca_2d
from selfsight.diagnostics.reconstruct import Reconstruction, reconstruct

__all__ = [
    "Reconstruction",
    "attention_distance",
    "attention_entropy",
    "attention_stats",
    "capture_attention",
    "cka_matrix",
    "diagnose",
    "head_diversity",
    "layer_features",
    "linear_cka",
    "patch_attention",
    "patch_coords",
    "pca_2d",
    "reconstruct",
]
