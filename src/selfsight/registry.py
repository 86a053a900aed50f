"""A decorator registry of pre-training methods, as timm registers its models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selfsight.errors import ConfigError

_METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_method("simmim")`` makes the method available by name.

    The class must define ``Config`` (a dataclass of its options with the paper's defaults).
    """

    def add(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        if not hasattr(cls, "Config"):
            raise TypeError(f"method {cls.__name__} has no Config dataclass")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return add


def list_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_METHODS)


def get_method_class(name: str) -> type:
    _import_builtin_methods()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def create_method(name: str, *args: Any, **kwargs: Any) -> Any:
    return get_method_class(name)(*args, **kwargs)


def _import_builtin_methods() -> None:
    import selfsight.methods  # noqa: F401  (registers the built-in methods)
