"""Built-in pre-training methods; importing this package registers them."""

from selfsight.methods import byol, dino, fd, moby, moco, pic, simclr, simmim  # noqa: F401
