"""Built-in pre-training methods; importing this package registers them."""

from selfsight.methods import byol, dino, fd, mae, moby, moco, pic, pixpro, simclr, simmim, spark  # noqa: F401
