"""Built-in pre-training methods; importing this package registers them."""

from selfsight.methods import simmim  # noqa: F401
