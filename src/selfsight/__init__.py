"""selfsight: self-supervised pre-training of timm backbones, few-label evaluation and export."""

__version__ = "0.1.0"
