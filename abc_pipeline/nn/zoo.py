"""Model zoo: ``build_model(name, ...)`` for classification and segmentation, with parameter matching.

Models (``MODELS``):

| name | layers | symmetry (exact) |
|---|---|---|
| ``cnn`` | ``nn.ConvNd`` + BatchNorm + ReLU | none |
| ``moment-trivial`` | MomentConv, scalar fields only (isotropic kernels) | grid group |
| ``moment-trivial-irrep`` | MomentConv, half scalar + half vector fields in hidden layers | grid group |
| ``gcnn-regular`` | GroupConv, regular representation of the grid group | grid group |
| ``cfnet`` | conic convolution + DFT transition (2D classification, square input) | 90° rotations about the centre |
| ``se2n-interp`` | group conv over D8, filters rotated by interpolation (2D, ``nn.se2n``) | D4 (45° approximate) |

The grid group is :func:`fields.grid_group(dim, spacing)`: D4 (8) in 2D, the 48 cube symmetries in
isotropic 3D, 16 with equal in-plane spacing only.

Architectures (``width`` = fields in the first layer; a vector field costs ``dim`` channels, a group-CNN
field ``|G|`` channels):
- classify: ``depth`` (default 5) stages conv -> norm -> nonlinearity with widths ``width * 2**i``; a parity
  downsampling after every stage but the last; the last stage has scalar fields only (for the group CNN:
  regular fields pooled over the group); global mean -> linear (the lab's MedMNIST layout).
- segment: a U-Net with ``depth`` (default 4) levels of widths ``width * 2**i``; each level is a residual
  double convolution ``h = act(bn(conv(x))); y = act(bn(conv(h)) + h)``; parity-aware down/upsampling that
  returns exactly to every skip's size (any size, odd or even); skips concatenated *by field type*; a 1x1
  head on scalars -> logits ``(B, n_classes, *spatial)``.

Small inputs: a downsampling stage halves an axis only if its size is > 1 (n -> ceil(n/2)), so any input
size works for any depth (a 9^3 patch goes 9 -> 5 -> 3 -> 2 -> 1; deeper stages then run at 1 voxel).
With anisotropic ``spacing`` a stage halves only the axes at least 2x finer than the coarsest (all axes when
there are none), and moment kernels at each stage are built for that stage's physical spacing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from abc_pipeline.errors import InputError
from abc_pipeline.nn.baselines import ConicConv2d, DFTTransition, GroupConv, RegularBatchNorm, group_pool
from abc_pipeline.nn.fields import cat_fields, check_spacing, grid_group, n_channels
from abc_pipeline.nn.layers import (
    FieldBatchNorm,
    FieldNonlinearity,
    InvariantHead,
    ParityDownsample,
    SegmentationHead,
    next_spacing,
    upsample_to,
)
from abc_pipeline.nn.moment import MomentConv

log = logging.getLogger(__name__)

MODELS = ("cnn", "moment-trivial", "moment-trivial-irrep", "gcnn-regular", "cfnet", "se2n-interp")
#: What a network outputs: ``classify`` logits per input, ``segment`` logits per voxel, ``patch`` a patch
#: classifier (logits per centred window, also densely per voxel), ``cell-context`` a patch trunk fused with
#: each cell's own expression (logits per cell).
HEADS = ("classify", "segment", "patch", "cell-context")
#: Stages (classify) or levels (the others) when ``depth`` is not given.
DEFAULT_DEPTH = {"classify": 5, "segment": 4, "patch": 4, "cell-context": 4}
SCALAR_ACTS = ("relu", "gelu")
PADDING_MODES = ("zeros", "circular")
_ACT = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class ModelSpec:
    """Every argument that rebuilds a zoo network: :func:`build_model` attaches it as ``model.spec``,
    checkpoints store :meth:`to_dict` (``model_spec``), and :meth:`build` rebuilds the same architecture
    (fresh weights; ``abc_pipeline.learn.checkpoint.load_model`` then loads the trained ones).

    ``head``: one of :data:`HEADS`; ``spacing``: physical voxel size per spatial axis (z, y, x; only ratios
    matter); ``width``, ``depth``: resolved (never ``None``); ``patch_size``: the window per axis (``patch`` and
    ``cell-context`` heads, else ``None``); ``n_expression``: the cell's own expression values and
    ``neighborhood_radii`` the disc radii of its neighbourhood means (``cell-context`` head, else ``None``).
    """

    name: str
    head: str
    dim: int
    in_channels: int
    n_classes: int
    width: int
    depth: int
    spacing: tuple[float, ...]
    kernel_size: int = 3
    padding_mode: str = "zeros"
    scalar_act: str = "relu"
    patch_size: tuple[int, ...] | None = None
    n_expression: int | None = None
    neighborhood_radii: tuple[float, ...] | None = None

    @property
    def objective(self) -> str:
        """What training optimises and scores: ``segment`` (per voxel) for the segment head, else ``classify``."""
        return "segment" if self.head == "segment" else "classify"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "model spec") -> ModelSpec:
        """The spec of :meth:`to_dict`; :class:`InputError` naming ``where`` on missing or unknown keys."""
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in values)
        unknown = sorted(set(values) - names)
        if missing or unknown:
            raise InputError(
                f"{where}: not a model spec of this abc-pipeline version (missing {missing}, unknown {unknown}); "
                "retrain the model with this version"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def build(self) -> nn.Module:
        """A fresh network of this spec (:func:`build_model`; weights newly initialised)."""
        return build_model(**asdict(self))


# ------------------------------------------------------------------------------------------- families
class _Family:
    """How one model family builds its layers. A *spec* is the tuple of field counts of a feature map."""

    def __init__(self, dim: int, kernel_size: int, padding_mode: str, scalar_act: str) -> None:
        if scalar_act not in _ACT:
            raise InputError(f"scalar_act must be one of {sorted(_ACT)}, got {scalar_act!r}")
        self.dim, self.kernel_size, self.padding_mode, self.scalar_act = dim, kernel_size, padding_mode, scalar_act

    def input(self, in_channels: int) -> tuple[int, ...]:
        return (in_channels,)

    def stage(self, width: int) -> tuple[int, ...]:
        return (width,)

    def last(self, width: int) -> tuple[int, ...]:
        """Spec of the last classification stage (scalar-only output)."""
        return (width,)

    def channels(self, spec: tuple[int, ...]) -> int:
        return n_channels(spec, self.dim)

    def cat(self, xa: torch.Tensor, a: tuple[int, ...], xb: torch.Tensor, b: tuple[int, ...]):
        return torch.cat([xa, xb], dim=1), tuple(i + j for i, j in zip(a, b))

    def to_scalars(self, spec: tuple[int, ...]) -> tuple[nn.Module, int]:
        """Module mapping a feature map to its invariant scalar channels, and their number."""
        return nn.Identity(), spec[0]

    def describe(self, spec: tuple[int, ...]) -> str:
        return f"{spec[0]} ch"


class _CNN(_Family):
    def conv(self, a, b, spacing):
        conv = nn.Conv2d if self.dim == 2 else nn.Conv3d
        return conv(a[0], b[0], self.kernel_size, padding=self.kernel_size // 2, padding_mode=self.padding_mode)

    def norm(self, spec):
        return (nn.BatchNorm2d if self.dim == 2 else nn.BatchNorm3d)(spec[0])

    def act(self, spec):
        return _ACT[self.scalar_act]()


class _Moment(_Family):
    def __init__(self, *args, vectors: bool) -> None:
        super().__init__(*args)
        self.vectors = vectors

    def stage(self, width):
        return (math.ceil(width / 2), width // 2) if self.vectors else (width,)

    def conv(self, a, b, spacing):
        return MomentConv(a, b, self.dim, self.kernel_size, spacing=spacing, padding_mode=self.padding_mode)

    def norm(self, spec):
        return FieldBatchNorm(spec)

    def act(self, spec):
        return FieldNonlinearity(spec, self.scalar_act)

    def cat(self, xa, a, xb, b):
        return cat_fields(xa, a, xb, b)

    def to_scalars(self, spec):
        return _TakeChannels(spec[0]), spec[0]

    def describe(self, spec):
        names = ("s", "v", "M")
        return " + ".join(f"{n} {names[r]}" for r, n in enumerate(spec) if n)


class _GCNN(_Family):
    """Specs are ``(n_scalars, n_regular)``: scalars only at the input, regular fields inside."""

    def __init__(self, *args, spacing) -> None:
        super().__init__(*args)
        self.group = grid_group(self.dim, spacing)

    def input(self, in_channels):
        return (in_channels, 0)

    def stage(self, width):
        return (0, width)

    last = stage

    def channels(self, spec):
        return spec[0] + spec[1] * len(self.group)

    def conv(self, a, b, spacing):
        return GroupConv(
            a[0] + a[1], b[1], self.group, self.kernel_size, lifting=a[1] == 0, padding_mode=self.padding_mode
        )

    def norm(self, spec):
        return RegularBatchNorm(spec[1], len(self.group))

    def act(self, spec):
        return _ACT[self.scalar_act]()

    def cat(self, xa, a, xb, b):
        return torch.cat([xa, xb], dim=1), (0, a[1] + b[1])

    def to_scalars(self, spec):
        return _GroupPool(len(self.group)), spec[1]

    def describe(self, spec):
        return f"{spec[1]} regular (|G|={len(self.group)})"


class _TakeChannels(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x):
        return x[:, : self.n]


class _GroupPool(nn.Module):
    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x):
        return group_pool(x, self.group_size)


# ----------------------------------------------------------------------------------------------- nets
def _stage_spacings(spacing: tuple[float, ...], n: int) -> list[tuple[float, ...]]:
    out = [spacing]
    for _ in range(n - 1):
        out.append(next_spacing(out[-1]))
    return out


class Classifier(nn.Module):
    """``(B, in_channels, *spatial) -> (B, n_classes)`` logits; see the module docstring."""

    def __init__(
        self, family: _Family, in_channels: int, n_classes: int, width: int, depth: int, spacing: tuple[float, ...]
    ) -> None:
        super().__init__()
        specs = [family.input(in_channels)] + [family.stage(width * 2**i) for i in range(depth - 1)]
        specs.append(family.last(width * 2 ** (depth - 1)))
        layers: list[nn.Module] = []
        for i, sp in enumerate(_stage_spacings(spacing, depth)):
            layers += [family.conv(specs[i], specs[i + 1], sp), family.norm(specs[i + 1]), family.act(specs[i + 1])]
            if i < depth - 1:
                layers.append(ParityDownsample(family.dim, sp))
        self.features = nn.Sequential(*layers)
        self.pool, n_scalars = family.to_scalars(specs[-1])
        self.head = InvariantHead(n_scalars, n_classes)
        self.first_spec = specs[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class _DoubleBlock(nn.Module):
    """``h = act(bn(conv(x))); y = act(bn(conv(h)) + h)`` (the residual adds identical layouts)."""

    def __init__(self, family: _Family, a, b, spacing) -> None:
        super().__init__()
        self.conv1, self.norm1, self.act1 = family.conv(a, b, spacing), family.norm(b), family.act(b)
        self.conv2, self.norm2, self.act2 = family.conv(b, b, spacing), family.norm(b), family.act(b)

    def forward(self, x):
        h = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(h)) + h)


class UNet(nn.Module):
    """``(B, in_channels, *spatial) -> (B, n_classes, *spatial)`` logits, same spatial size for any size."""

    def __init__(
        self, family: _Family, in_channels: int, n_classes: int, width: int, depth: int, spacing: tuple[float, ...]
    ) -> None:
        super().__init__()
        self.family = family
        spacings = _stage_spacings(spacing, depth)
        self.specs = [family.stage(width * 2**i) for i in range(depth)]
        prev = family.input(in_channels)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, spec in enumerate(self.specs):
            self.encoders.append(_DoubleBlock(family, prev, spec, spacings[i]))
            if i < depth - 1:
                self.downs.append(ParityDownsample(family.dim, spacings[i]))
            prev = spec
        self.decoders = nn.ModuleList()
        self._cat_specs = []
        for i in reversed(range(depth - 1)):
            cat_spec = tuple(p + q for p, q in zip(self.specs[i], prev))
            self._cat_specs.append((self.specs[i], prev))
            self.decoders.append(_DoubleBlock(family, cat_spec, self.specs[i], spacings[i]))
            prev = self.specs[i]
        self.pool, n_scalars = family.to_scalars(prev)
        self.head = SegmentationHead(n_scalars, n_classes, family.dim)
        self.first_spec = self.specs[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.downs):
                skips.append(x)
                x = self.downs[i](x)
        for dec, (skip_spec, up_spec) in zip(self.decoders, self._cat_specs):
            skip = skips.pop()
            x, _ = self.family.cat(skip, skip_spec, upsample_to(x, skip.shape[2:]), up_spec)
            x = dec(x)
        return self.head(self.pool(x))


class CFNet(nn.Module):
    """CFNet for 2D classification: conic convolutions (widths ``width * 2**i``), BN, ReLU, parity
    downsampling, DFT transition (``4 * width`` templates), BN, linear. Exactly invariant to 90° rotations
    of square inputs about the image centre."""

    def __init__(
        self, in_channels: int, n_classes: int, width: int, depth: int, kernel_size: int, scalar_act: str
    ) -> None:
        super().__init__()
        chans = [in_channels] + [width * 2**i for i in range(depth)]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                ConicConv2d(chans[i], chans[i + 1], kernel_size),
                nn.BatchNorm2d(chans[i + 1]),
                _ACT[scalar_act](),
            ]
            if i < depth - 1:
                layers.append(ParityDownsample(2))
        self.features = nn.Sequential(*layers)
        self.transition = DFTTransition(chans[-1], nodes=4 * width)
        self.norm = nn.BatchNorm1d(self.transition.out_features)
        self.linear = nn.Linear(self.transition.out_features, n_classes)
        self.first_spec = (width,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.transition(self.features(x))))


# ----------------------------------------------------------------------------------------------- API
def _family(name: str, dim: int, spacing, kernel_size: int, padding_mode: str, scalar_act: str) -> _Family:
    args = (dim, kernel_size, padding_mode, scalar_act)
    if name == "cnn":
        return _CNN(*args)
    if name in ("moment-trivial", "moment-trivial-irrep"):
        return _Moment(*args, vectors=name.endswith("irrep"))
    if name == "gcnn-regular":
        return _GCNN(*args, spacing=spacing)
    if name == "se2n-interp":
        from abc_pipeline.nn.se2n import SE2NFamily

        return SE2NFamily(*args, spacing=spacing)
    raise InputError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def default_width(name: str, dim: int, spacing: Sequence[float] | None = None) -> int:
    """The lab's parameter-matched widths (~1.5 M params in 2D): cnn 32, moment-trivial 55,
    moment-trivial-irrep 58 (29 s + 29 v), cfnet 32; gcnn-regular ``round(32 / sqrt(|G|))`` (about the
    parameters of cnn 32), se2n-interp likewise with |D8| = 16 (8)."""
    if name == "gcnn-regular":
        return max(1, round(32 / math.sqrt(len(grid_group(dim, spacing)))))
    if name == "se2n-interp":
        return 8
    return {"cnn": 32, "moment-trivial": 55, "moment-trivial-irrep": 58, "cfnet": 32}[name]


def _build(
    name: str,
    dim: int,
    in_channels: int,
    n_classes: int,
    head: str,
    width: int,
    spacing: tuple[float, ...],
    depth: int,
    kernel_size: int,
    padding_mode: str,
    scalar_act: str,
    patch_size,
    n_expression: int,
    neighborhood_radii: tuple[float, ...],
) -> nn.Module:
    if name == "cfnet":
        if dim != 2 or head != "classify":
            raise InputError("cfnet is a 2D classification model (head='classify', dim=2)")
        if spacing[0] != spacing[1]:
            raise InputError(f"cfnet needs isotropic pixels (90° rotations), got spacing {spacing}")
        if padding_mode != "zeros":
            raise InputError("cfnet uses zero padding only")
        return CFNet(in_channels, n_classes, width, depth, kernel_size, scalar_act)
    family = _family(name, dim, spacing, kernel_size, padding_mode, scalar_act)
    if head == "classify":
        return Classifier(family, in_channels, n_classes, width, depth, spacing)
    if head == "patch":
        from abc_pipeline.nn.patch import PatchClassifier

        return PatchClassifier(family, in_channels, n_classes, width, depth, spacing, patch_size)
    if head == "cell-context":
        from abc_pipeline.nn.cell_context import CellContextClassifier

        return CellContextClassifier(
            family, in_channels, n_expression, n_classes, width, depth, spacing, patch_size, neighborhood_radii
        )
    return UNet(family, in_channels, n_classes, width, depth, spacing)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(
    name: str,
    dim: int,
    in_channels: int,
    n_classes: int,
    head: str = "classify",
    width: int | None = None,
    target_params: int | None = None,
    spacing: Sequence[float] | None = None,
    *,
    depth: int | None = None,
    kernel_size: int = 3,
    padding_mode: str = "zeros",
    scalar_act: str = "relu",
    patch_size: int | Sequence[int] | None = 5,
    n_expression: int | None = None,
    neighborhood_radii: Sequence[float] | None = None,
) -> nn.Module:
    """Build a zoo model (see the module docstring for the architectures).

    Input ``(B, in_channels, *spatial)`` (image channels as scalar fields); ``head="classify"`` returns
    logits ``(B, n_classes)``, ``head="segment"`` logits ``(B, n_classes, *spatial)`` of the input's size,
    ``head="patch"`` a :class:`abc_pipeline.nn.patch.PatchClassifier` (stride-1 trunk of ``depth``, default 4,
    stages; window ``patch_size``; also dense); ``head="cell-context"`` a
    :class:`abc_pipeline.nn.cell_context.CellContextClassifier` (the patch trunk as an invariant context
    embedding fused with the cell's own ``n_expression`` channel values, default ``in_channels - 1``, and its
    neighbourhood means over discs of ``neighborhood_radii``, in units of the smallest voxel side, default
    :data:`abc_pipeline.nn.cell_context.DEFAULT_NEIGHBORHOOD_RADII` of ``dim``; ``()``: none).
    ``width`` = fields in the first layer; or ``target_params`` solves the width (binary search) whose
    parameter count is closest; neither: :func:`default_width`. ``spacing`` = physical voxel size per
    axis (z, y, x), for anisotropic grids. ``kernel_size``, ``padding_mode`` (:data:`PADDING_MODES`) and
    ``scalar_act`` (:data:`SCALAR_ACTS`) apply to every layer.

    The model gets ``spec`` (a :class:`ModelSpec` of every resolved argument: ``spec.build()`` rebuilds it),
    ``task`` (``spec.objective``: what training optimises), ``name``, ``width``, ``dim``, ``group_size``
    (elements of the exact symmetry group) and ``n_params``.
    """
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if dim not in (2, 3):
        raise InputError(f"dim must be 2 or 3, got {dim}")
    if head not in HEADS:
        raise InputError(f"head must be one of {HEADS}, got {head!r}")
    if in_channels < 1 or n_classes < 1:
        raise InputError(f"in_channels and n_classes must be >= 1, got {in_channels}, {n_classes}")
    if width is not None and target_params is not None:
        raise InputError("give either width or target_params, not both")
    if padding_mode not in PADDING_MODES:
        raise InputError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if scalar_act not in SCALAR_ACTS:
        raise InputError(f"scalar_act must be one of {SCALAR_ACTS}, got {scalar_act!r}")
    physical = tuple(float(s) for s in check_spacing(spacing, dim))
    relative = tuple(s / min(physical) for s in physical)
    depth = DEFAULT_DEPTH[head] if depth is None else int(depth)
    if head in ("patch", "cell-context"):
        from abc_pipeline.nn.patch import check_patch_size

        patch_size = check_patch_size(5 if patch_size is None else patch_size, dim)
    else:
        patch_size = None
    n_expression = (in_channels - 1 if n_expression is None else int(n_expression)) if head == "cell-context" else None
    if head == "cell-context":
        from abc_pipeline.nn.cell_context import DEFAULT_NEIGHBORHOOD_RADII

        radii = DEFAULT_NEIGHBORHOOD_RADII[dim] if neighborhood_radii is None else neighborhood_radii
        neighborhood_radii = tuple(float(r) for r in radii)
    else:
        neighborhood_radii = None

    def build(w: int) -> nn.Module:
        return _build(
            name,
            dim,
            in_channels,
            n_classes,
            head,
            w,
            relative,
            depth,
            kernel_size,
            padding_mode,
            scalar_act,
            patch_size,
            n_expression,
            neighborhood_radii,
        )

    if target_params is not None:
        width = solve_width(build, target_params)
    elif width is None:
        width = default_width(name, dim, relative)
    if width < 1:
        raise InputError(f"width must be >= 1, got {width}")
    model = build(width)
    model.spec = ModelSpec(
        name=name,
        head=head,
        dim=dim,
        in_channels=in_channels,
        n_classes=n_classes,
        width=width,
        depth=depth,
        spacing=physical,
        kernel_size=kernel_size,
        padding_mode=padding_mode,
        scalar_act=scalar_act,
        patch_size=patch_size,
        n_expression=n_expression,
        neighborhood_radii=neighborhood_radii,
    )
    model.name, model.width, model.task, model.dim = name, width, model.spec.objective, dim
    if name == "cnn":
        model.group_size = 1
    elif name == "cfnet":
        model.group_size = 4
    else:
        model.group_size = len(grid_group(dim, relative))
    model.n_params = count_parameters(model)
    return model


def solve_width(build: Callable[[int], nn.Module], target_params: int, max_width: int = 1 << 14) -> int:
    """Width whose model (``build(width)``, instantiated on the meta device) has the parameter count
    closest to ``target_params``; parameters grow monotonically with width."""

    def params(w: int) -> int:
        with torch.device("meta"):
            return count_parameters(build(w))

    if target_params < 1:
        raise InputError(f"target_params must be >= 1, got {target_params}")
    hi = 1
    while params(hi) < target_params:
        if hi >= max_width:
            raise InputError(f"target_params={target_params} needs a width above {max_width}")
        hi *= 2
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:  # smallest width with params >= target
        mid = (lo + hi) // 2
        if params(mid) >= target_params:
            hi = mid
        else:
            lo = mid + 1
    if hi > 1 and target_params - params(hi - 1) < params(hi) - target_params:
        return hi - 1
    return hi


def model_table(
    dim: int,
    in_channels: int,
    n_classes: int,
    head: str = "classify",
    target_params: int | None = None,
    width: int | None = None,
    spacing: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> list[dict]:
    """One row per model: ``model``, ``width``, ``first_layer`` (fields), ``first_layer_channels``,
    ``group_size``, ``params``. Models that do not apply (cfnet outside 2D classification, se2n-interp
    outside 2D) are skipped."""
    rows = []
    for name in names or MODELS:
        if (name == "cfnet" and (dim != 2 or head != "classify")) or (name == "se2n-interp" and dim != 2):
            continue
        with torch.device("meta"):
            m = build_model(
                name, dim, in_channels, n_classes, head, width=width, target_params=target_params, spacing=spacing
            )
        fam = None if name == "cfnet" else _family(name, dim, spacing, 3, "zeros", "relu")
        first = m.first_spec
        rows.append(
            {
                "model": name,
                "width": m.width,
                "first_layer": fam.describe(first) if fam else f"{first[0]} ch",
                "first_layer_channels": fam.channels(first) if fam else first[0],
                "group_size": m.group_size,
                "params": m.n_params,
            }
        )
    return rows


def format_model_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`model_table` rows."""
    lines = [
        "| model | width | first layer | first-layer channels | exact group | parameters |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['width']} | {r['first_layer']} | {r['first_layer_channels']} | "
            f"{r['group_size']} | {r['params']:,} |"
        )
    return "\n".join(lines)


def print_model_table(
    dim: int,
    in_channels: int,
    n_classes: int,
    head: str = "classify",
    target_params: int | None = None,
    width: int | None = None,
    spacing: Sequence[float] | None = None,
) -> None:
    """Print :func:`model_table` as markdown (the ``abc-pipeline models`` command)."""
    print(format_model_table(model_table(dim, in_channels, n_classes, head, target_params, width, spacing)))
