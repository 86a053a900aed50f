"""selfsight: self-supervised pre-training of timm backbones, few-label evaluation and export.

The Python API (imported on first use, so ``import selfsight`` stays fast)::

    import selfsight
    selfsight.pretrain("~/photos", out="runs/photos")            # options chosen from the images
    selfsight.evaluate("knn", run="runs/photos", train_data="~/labeled", test_data="~/test")
    selfsight.export("runs/photos", out="exported/photos")       # weights, config.json, README.md
    model = selfsight.load_backbone("exported/photos")          # a timm model, eval mode
    selfsight.describe_methods()                                 # the methods, papers and defaults
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "describe_methods", "evaluate", "export", "load_backbone", "pretrain"]

if TYPE_CHECKING:
    from selfsight.api import describe_methods, evaluate, export, load_backbone, pretrain


def __getattr__(name: str) -> Any:
    if name in __all__:
        from selfsight import api

        return getattr(api, name)
    raise AttributeError(f"module 'selfsight' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
