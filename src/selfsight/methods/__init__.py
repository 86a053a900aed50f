"""Built-in pre-training methods; importing this package registers them."""

from selfsight.methods import byol, dino, moby, moco, simclr, simmim  # noqa: F401
