"""Typed configuration: defaults (the dataclasses) -> YAML file -> ``key=value`` overrides.

The resolved configuration is written into the run dir as ``config.yaml``, so every run can be
repeated from its own folder (``selfsight pretrain --config RUN/config.yaml``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfsight.errors import ConfigError
from selfsight.registry import get_method_class

#: The built-in default data: Debian's dataset-fashion-mnist package.
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_DATA = f"{DEFAULT_DATA_DIR}:train"
DEFAULT_TEST_DATA = f"{DEFAULT_DATA_DIR}:test"
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 1.5e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    #: warm-up length as a fraction of all steps (used when warmup_steps is None)
    warmup_fraction: float = 0.05
    warmup_steps: int | None = None
    #: final learning rate as a fraction of lr
    min_lr_ratio: float = 0.01
    #: max gradient norm; 0 disables clipping
    clip_grad: float = 5.0
    #: micro-batches per optimiser step
    accum_steps: int = 1


@dataclass
class PretrainConfig:
    method: str = "simmim"
    backbone: str = "vit_tiny_patch16_224"
    backbone_opts: dict[str, Any] = field(
        default_factory=lambda: {
            "img_size": 28,
            "patch_size": 4,
            "in_chans": 1,
            "embed_dim": 128,
            "depth": 6,
            "num_heads": 4,
        }
    )
    data: str = DEFAULT_DATA
    out: str = "runs/pretrain"
    #: budgets: the first one given of steps, epochs, minutes (steps by default)
    steps: int | None = None
    epochs: float | None = None
    minutes: float | None = None
    batch_size: int = 128
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    device: str = "auto"
    #: auto, fp32 or bf16 (autocast). auto: bf16 on CUDA (where supported) and on CPUs with native bf16
    #: when a timed probe finds it faster than fp32; fp32 elsewhere. The run's config.yaml holds the choice.
    precision: str = "auto"
    #: steps in a row with non-finite gradients (each one skipped) after which the run stops
    max_consecutive_skips: int = 10
    #: jsonl (metrics.jsonl only) or tensorboard (metrics.jsonl and RUN/tensorboard; needs the extra)
    logger: str = "jsonl"
    #: channels_last memory format; None = on for CNN backbones (about 30% faster on CPU), off otherwise
    channels_last: bool | None = None
    #: DataLoader workers for large image folders (in-memory data needs none)
    num_workers: int = 2
    #: torch.compile the method's networks (slow to start; pays off on long GPU runs)
    compile: bool = False
    #: labeled held-out data for the online k-NN monitor (None = no monitor)
    monitor_data: str | None = None
    #: steps between k-NN monitor measurements (and one at the end)
    monitor_every: int = 200
    #: images drawn from monitor_data: half memory bank, half queries
    monitor_size: int = 2000
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: the method's own options (its Config dataclass); filled with its defaults when resolved
    method_config: Any = None

    def resolve(self) -> PretrainConfig:
        """Fill ``method_config`` with the method's Config (defaults + given values) and check values."""
        cls = get_method_class(self.method)
        given = self.method_config
        if given is None:
            self.method_config = cls.Config()
        elif isinstance(given, dict):
            self.method_config = from_dict(cls.Config, given, f"{self.method} options")
        if sum(x is not None for x in (self.steps, self.epochs, self.minutes)) > 1:
            raise ConfigError("give one budget: steps, epochs or minutes")
        if self.steps is None and self.epochs is None and self.minutes is None:
            self.steps = 1000
        if self.logger not in ("jsonl", "tensorboard"):
            raise ConfigError(f"logger must be jsonl or tensorboard, got {self.logger!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in (
            "batch_size", "log_every", "ckpt_every", "keep_checkpoints", "monitor_every", "monitor_size",
            "max_consecutive_skips",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.optim.accum_steps < 1:
            raise ConfigError("optim.accum_steps must be at least 1")
        return self


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type (tuples, optionals, nested dataclasses)."""
    if isinstance(kind, str):
        raise ConfigError(f"internal: unresolved annotation {kind} for {where}")
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(kind, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list like [a, b], got {value!r}")
        return tuple(_coerce(args[0] if args else Any, v, where) for v in value)
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if kind is Any:
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, float, str, bool) and not isinstance(value, kind):
        raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be int, got {value!r}")
    return value


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown {where} option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain dicts, tuples -> lists (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); values are read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().replace("-", "_").split("."), value


def _owner_of(name: str, method: str) -> list[str]:
    """Where a bare override name lives: top level, ``optim`` or ``method_config``."""
    places = []
    if name in {f.name for f in dataclasses.fields(PretrainConfig)}:
        places.append("")
    if name in {f.name for f in dataclasses.fields(OptimConfig)}:
        places.append("optim")
    if name in {f.name for f in dataclasses.fields(get_method_class(method).Config)}:
        places.append("method_config")
    return places


def build_config(file: str | Path | None = None, overrides: list[str] | None = None, **given: Any) -> PretrainConfig:
    """defaults -> YAML ``file`` -> ``given`` (CLI flags that were set) -> ``key=value`` overrides.

    Override keys may be dotted (``optim.lr=1e-3``, ``method.mask_ratio=0.5``) or bare when the
    name is unambiguous (``lr=1e-3``, ``mask_ratio=0.5``).
    """
    merged: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        merged.update(loaded)
    merged.update({k: v for k, v in given.items() if v is not None})
    method = merged.get("method", PretrainConfig.method)
    for item in overrides or []:
        path, value = parse_override(item)
        if path[0] == "method" and len(path) > 1:
            path = ["method_config", *path[1:]]
        if len(path) == 1:
            places = _owner_of(path[0], method)
            if not places:
                raise ConfigError(f"unknown option {path[0]!r} in override {item!r}")
            if len(places) > 1:
                raise ConfigError(f"option {path[0]!r} is ambiguous; write {'.'.join([places[1], path[0]])}=...")
            path = [p for p in (places[0], path[0]) if p]
        target = merged
        for part in path[:-1]:
            target = target.setdefault(part, {}) if isinstance(target.get(part), dict | type(None)) else target[part]
        target[path[-1]] = value
    cfg = from_dict(PretrainConfig, merged, "config")
    return cfg.resolve()


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(path: str | Path) -> PretrainConfig:
    """Read a run's ``config.yaml`` back into a resolved PretrainConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is this a selfsight run directory?")
    return from_dict(PretrainConfig, yaml.safe_load(path.read_text()) or {}, "config").resolve()
