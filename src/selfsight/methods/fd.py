"""Feature Distillation (Wei et al. 2022, "Contrastive Learning Rivals Masked Image Modeling in
Fine-tuning via Feature Distillation"; official code ``SwinTransformer/Feature-Distillation``).

A frozen, pre-trained teacher (a selfsight run directory or export directory, ``teacher=PATH``) gives
the target: its full token map after its own final norm (ViT: class token(s) and patch tokens; Swin:
the last stage's map; CNN: the last feature map, flattened), whitened per token by a LayerNorm without
affine parameters. The student (from scratch) sees the same view and predicts that map from its own
token map through a linear projector (the official 1x1 convolution, student width -> teacher width).
Loss: SmoothL1 with beta 2.0, mean over tokens and channels. Views: random resized crop (0.08-1) and
flip only. Paper's optimisation (engine options, not this Config): AdamW (0.9, 0.999), base lr 3e-4 x
batch / 512 (``lr=1.2e-3`` at batch 2048), 10 warm-up epochs, weight decay 0.05, gradient clip 3.0,
drop path 0.1-0.3 (``--backbone-opt drop_path_rate=0.1``).

Teacher and student may differ in width, depth, patch size and family. Each one's input uses its own
normalisation (the student's view is un-normalised and re-normalised with the teacher's mean/std,
resized to the teacher's input size, and a 1-channel view is repeated for a 3-channel teacher). Token
grids: the teacher's map is resized (bilinear, antialiased when shrinking) to the student's grid, or,
with ``resize_teacher_map=false``, grids that differ are refused. Prefix tokens (class token) are
predicted when teacher and student have as many; otherwise the loss covers the patch tokens only.

Relative position bias: timm's plain ViT (``VisionTransformer``) has none, so a ``vit_*`` student keeps its
absolute position embedding (the choice here); a Swin / SwinV2 student has timm's own relative position
bias in every block (the paper's other student). timm's ``vit_relpos_*`` with ``shared_rel_pos=true`` is the
paper's shared bias and trains with FD, but selfsight's Backbone files it under family ``other``, whose
per-layer features (eval, diagnose) it cannot read yet, and its unused ``fc_norm`` stops DDP (no unused
parameters). The paper's layer scale 0.1 is ``--backbone-opt init_values=0.1``.

The teacher is frozen (``requires_grad=False``, ``torch.no_grad``) and stays in eval mode whatever
``train()`` is called with. It is not part of the state dict (checkpoints hold the student, projector
and a SHA-256 digest of the teacher): a resumed run re-loads the teacher from ``teacher`` (made absolute,
in the run's config.yaml) and refuses to go on when the weights found there differ from the digest, or
when the path is gone. Checkpoints stay the size of the student (a ViT-L teacher would add 1.2 GB to
each), and ``export`` / ``eval`` / ``diagnose`` see the student (``export_backbone = "backbone"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfsight.backbones import Backbone
from selfsight.checkpoint import load_run_backbone
from selfsight.data.views import ViewSpec, adapt_spec
from selfsight.errors import ConfigError
from selfsight.methods.base import Method, StepOutput
from selfsight.methods.common import full_precision
from selfsight.registry import register_method

log = logging.getLogger("selfsight")


def whiten(tokens: torch.Tensor) -> torch.Tensor:
    """Per-token whitening: LayerNorm without affine parameters over the last dim. tokens: [..., D]."""
    return F.layer_norm(tokens, tokens.shape[-1:])


def fd_loss(prediction: torch.Tensor, teacher_tokens: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """SmoothL1(beta) between the prediction and the whitened teacher tokens, mean over tokens and channels.

    prediction, teacher_tokens: [B, L, D] (any matching shape; whitening is over the last dim).
    """
    if prediction.shape != teacher_tokens.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(teacher_tokens.shape)} differ")
    return F.smooth_l1_loss(prediction, whiten(teacher_tokens.detach()), beta=beta)


def token_map(backbone: Backbone, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The last layer's tokens after the model's final norm: ``(prefix [B, P, D] or None, map [B, D, h, w])``.

    x: [B, C, img_size, img_size]. ViTs (and other token models) give their prefix tokens (class,
    registers) and the patch grid; Swin its last stage's NHWC map; CNNs their last NCHW map.
    """
    feats = backbone.model.forward_features(x)
    if feats.ndim == 3:  # [B, P + L, D]
        p = backbone.num_prefix_tokens
        patches = feats[:, p:]
        h, w = backbone.grid_size
        if h * w != patches.shape[1]:
            raise ConfigError(f"{backbone.name}: {patches.shape[1]} patch tokens do not form its {h}x{w} grid")
        grid = patches.transpose(1, 2).reshape(feats.shape[0], -1, h, w)
        return (feats[:, :p] if p else None), grid
    if backbone.family == "swin":  # NHWC
        return None, feats.permute(0, 3, 1, 2)
    return None, feats


def flatten_map(grid: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B, h * w, D] (row-major, as ViT patch tokens)."""
    return grid.flatten(2).transpose(1, 2)


def resize_map(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, D, h, w] -> [B, D, *size], bilinear (antialiased when shrinking); unchanged when already that size."""
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    shrink = size[0] < grid.shape[-2] or size[1] < grid.shape[-1]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@dataclass
class Teacher:
    """A loaded teacher: its backbone (eval mode), input normalisation, where it came from, its digest."""

    backbone: Backbone
    mean: list[float]
    std: list[float]
    source: str
    digest: bytes


def teacher_digest(backbone: Backbone, mean: list[float], std: list[float]) -> bytes:
    """SHA-256 over the architecture, options, every tensor of the state dict (name, dtype, shape, bytes)
    and the normalisation: equal digests mean the same teacher."""
    h = hashlib.sha256()
    h.update(json.dumps([backbone.name, repr(sorted(backbone.timm_kwargs.items())), mean, std]).encode())
    for name, tensor in sorted(backbone.model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def _load_export(folder: Path) -> tuple[Backbone, list[float], list[float]]:
    """A teacher from an export directory (``selfsight.checkpoint.export_run``): timm-style config.json and
    model.safetensors (read by safetensors: tensors only, nothing executed)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    pretrained = config.get("pretrained_cfg", {})
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get("model_args", {}).items()}
    in_chans, _, size = pretrained.get("input_size", [None, None, None])
    if size is not None:
        opts.setdefault("img_size", size)  # CNNs: selfsight's size (timm's constructor takes none)
    if in_chans is not None:
        opts.setdefault("in_chans", in_chans)
    backbone = Backbone(config["architecture"], opts)
    try:
        backbone.model.load_state_dict(load_file(folder / "model.safetensors"))
    except (RuntimeError, OSError) as exc:
        name = config["architecture"]
        raise ConfigError(f"FD teacher {folder}: model.safetensors does not fit {name}: {exc}") from None
    if "mean" not in pretrained or "std" not in pretrained:
        raise ConfigError(f"FD teacher {folder}: config.json has no pretrained_cfg mean/std")
    return backbone, list(pretrained["mean"]), list(pretrained["std"])


def load_teacher(path: str | None) -> Teacher:
    """The frozen teacher at ``path``: a selfsight run directory (its newest checkpoint, read with
    ``selfsight.checkpoint.load_run_backbone``) or an export directory (model.safetensors + config.json)."""
    if not path:
        raise ConfigError("FD needs a teacher: teacher=PATH, a selfsight run directory or export directory")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(
            f"FD teacher {path} not found (a resumed FD run re-loads its teacher from the path it was started "
            "with: restore it there, or start a new run)"
        )
    if (folder / "run.json").is_file():
        backbone, info = load_run_backbone(folder)
        mean, std = list(info["mean"]), list(info["std"])
    elif (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        backbone, mean, std = _load_export(folder)
    else:
        raise ConfigError(
            f"FD teacher {path} is neither a selfsight run directory (run.json, checkpoints/) nor an export "
            "directory (model.safetensors, config.json)"
        )
    backbone.requires_grad_(False)
    backbone.eval()
    return Teacher(backbone, mean, std, str(folder.resolve()), teacher_digest(backbone, mean, std))


def _drop_teacher_from_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the teacher's tensors are never saved (it is re-loaded from its path)."""
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


@register_method("fd")
class FD(Method):
    """Feature Distillation of a frozen teacher's token map into a timm ViT or Swin student."""

    @dataclass
    class Config:
        """FD's defaults (Wei et al. 2022, official ``configs/pretrain/fd_pretrain__*.yaml``)."""

        #: the teacher: a selfsight run directory or export directory (model.safetensors + config.json)
        teacher: str | None = None
        crop_scale: tuple[float, float] = (0.08, 1.0)
        hflip_p: float = 0.5
        #: SmoothL1's beta
        beta: float = 2.0
        #: resize the teacher's map to the student's token grid; false: refuse grids that differ
        resize_teacher_map: bool = True

    def __init__(self, backbone: Backbone, config: FD.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        teacher = load_teacher(config.teacher)
        config.teacher = teacher.source  # absolute: the run's config.yaml finds it again from any directory
        t = teacher.backbone
        if t.in_chans != backbone.in_chans and backbone.in_chans != 1:
            raise ConfigError(f"FD: the teacher takes {t.in_chans} channels, the student {backbone.in_chans}")
        self.teacher = t
        self.register_buffer("teacher_mean", torch.tensor(teacher.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("teacher_std", torch.tensor(teacher.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("teacher_digest", torch.frombuffer(bytearray(teacher.digest), dtype=torch.uint8))
        self.register_state_dict_post_hook(_drop_teacher_from_state_dict)
        spec = ViewSpec(size=backbone.img_size, crop_scale=config.crop_scale, hflip_p=config.hflip_p,
                        jitter_p=0.0, grayscale_p=0.0)
        self.view_specs = [adapt_spec(spec, backbone.in_chans, backbone.img_size)]
        s_prefix, s_grid, t_prefix, t_grid = self._probe()
        self.grid = tuple(s_grid.shape[-2:])
        self.teacher_grid = tuple(t_grid.shape[-2:])
        if self.grid != self.teacher_grid and not config.resize_teacher_map:
            raise ConfigError(
                f"FD: the teacher's token grid {self.teacher_grid} (input {t.img_size} px) does not match the "
                f"student's {self.grid} (input {backbone.img_size} px); choose sizes whose grids align, or set "
                "resize_teacher_map=true"
            )
        n_s = 0 if s_prefix is None else s_prefix.shape[1]
        n_t = 0 if t_prefix is None else t_prefix.shape[1]
        self.match_prefix = n_s == n_t > 0
        self.projector = nn.Linear(s_grid.shape[1], t_grid.shape[1])
        log.info(
            "FD teacher %s (%s, %s): grid %s -> student grid %s%s, %d -> %d channels, digest %s",
            teacher.source, t.name, t.family, self.teacher_grid, self.grid,
            ", prefix tokens matched" if self.match_prefix else "", s_grid.shape[1], t_grid.shape[1],
            teacher.digest.hex()[:16],
        )

    @torch.no_grad()
    def _probe(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Token maps of a blank image through student and teacher (eval mode, no random draws): their shapes."""
        was_training = self.backbone.training
        self.backbone.eval()
        x = torch.zeros(1, self.backbone.in_chans, self.backbone.img_size, self.backbone.img_size)
        s_prefix, s_grid = token_map(self.backbone, x)
        t_prefix, t_grid = token_map(self.teacher, self._teacher_input(x))
        self.backbone.train(was_training)
        return s_prefix, s_grid, t_prefix, t_grid

    def train(self, mode: bool = True) -> FD:
        """As nn.Module.train; the teacher stays in eval mode (frozen BatchNorm statistics, no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's normalised view [B, C_s, S, S] -> the teacher's input [B, C_t, S_t, S_t], normalised
        with the teacher's mean/std."""
        pixels = x * self.std + self.mean
        if pixels.shape[1] != self.teacher.in_chans:  # a gray view for a colour teacher
            pixels = pixels.expand(-1, self.teacher.in_chans, -1, -1)
        size = self.teacher.img_size
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            shrink = size < pixels.shape[-1]
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        return (pixels - self.teacher_mean) / self.teacher_std

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's token map of the student's view x, on the student's grid, before whitening:
        [B, (P +) h * w, D_t] (prefix tokens first when matched)."""
        prefix, grid = token_map(self.teacher, self._teacher_input(x))
        tokens = flatten_map(resize_map(grid.float(), self.grid))
        if self.match_prefix:
            tokens = torch.cat([prefix.float(), tokens], dim=1)
        return tokens

    def predictions(self, x: torch.Tensor) -> torch.Tensor:
        """The student's prediction of the teacher's tokens: [B, (P +) h * w, D_t]."""
        prefix, grid = token_map(self.backbone, x)
        tokens = flatten_map(grid)
        if self.match_prefix:
            tokens = torch.cat([prefix, tokens], dim=1)
        return self.projector(tokens)

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        (x,) = self.views(images, generator)
        target = self.targets(x)
        prediction = self.predictions(x)
        with full_precision(x.device):
            prediction = prediction.float()
            loss = fd_loss(prediction, target, self.config.beta)
            with torch.no_grad():
                cosine = F.cosine_similarity(prediction, whiten(target), dim=-1).mean()
        return StepOutput(loss=loss, metrics={"target_cosine": float(cosine)})

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "teacher_digest")
        if saved is not None and not torch.equal(saved.cpu(), self.teacher_digest.cpu()):
            raise ConfigError(
                f"FD: the teacher at {self.config.teacher} is not the one this run was trained with (digest "
                f"{bytes(self.teacher_digest.cpu().tolist()).hex()[:16]}, the checkpoint's "
                f"{bytes(saved.cpu().tolist()).hex()[:16]}): restore that teacher, or start a new run"
            )
        for key, value in self.teacher.state_dict().items():  # not in checkpoints: keep the loaded teacher
            state_dict.setdefault(prefix + "teacher." + key, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
