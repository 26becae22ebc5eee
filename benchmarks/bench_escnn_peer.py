"""escnn's steerable CNNs (QUVA-Lab) measured beside the zoo, in their own environment (never a dependency).

Run with the escnn venv's interpreter and this checkout on PYTHONPATH (recipe: docs/benchmarks.md):

    PYTHONPATH=$PWD /work/venvs/escnn/bin/python benchmarks/bench_escnn_peer.py --npz rings.npz \\
        --out runs/rings-escnn --target-params 100000 --epochs 10
    PYTHONPATH=$PWD /work/venvs/escnn/bin/python benchmarks/bench_escnn_peer.py --raster atlas.ome.zarr \\
        --cells cells.zarr --out runs/region-escnn --target-params 100000 --epochs 5      # region U-Net
    PYTHONPATH=$PWD /work/venvs/escnn/bin/python benchmarks/bench_escnn_peer.py --raster atlas.ome.zarr \\
        --cells cells.zarr --task celltype --level class --patch-size 5 --max-samples 4000 \\
        --out runs/celltype-escnn --target-params 20000 --epochs 5 --any-angle           # cell-type patches

Models (2D, the zoo's layouts: classifier = ``depth`` stages conv -> norm -> nonlinearity of widths
``width * 2**i`` with the zoo's parity-aware downsampling between them, last stage invariant, global mean,
linear; patch classifier (``--task celltype``, :class:`abc_pipeline.nn.patch.PatchClassifier`'s layout) =
``--depth`` stride-1 stages of ``width`` fields, last stage invariant, mean over the centred ``--patch-size``
window of the ``P + 2 * depth`` input patch, linear (also densely over a tile, for the any-angle score);
U-Net = the zoo's residual double blocks, parity down/upsampling, skips concatenated with
``tensor_directsum``, a 1 x 1 steerable head to class scalars):

- ``escnn-o2-irrep``: ``flipRot2dOnR2(N=-1)`` (O(2)), hidden fields ``ceil(w/2)`` trivial + ``floor(w/2)``
  ``irrep(1, 1)`` (2D vectors), ``GNormBatchNorm`` + ``NormNonLinearity('n_relu')``: the steerable peer of
  ``moment-trivial-irrep``.
- ``escnn-d8-regular``: ``flipRot2dOnR2(N=8)`` (D8) regular fields (16 channels), ``InnerBatchNorm`` + ReLU,
  ``GroupPooling``: the steerable peer of ``se2n-interp`` (the same group, filters from a steerable basis
  instead of interpolated rotations).

Same data and split (``npz_task`` / ``atlas_task`` with bench-models' atlas options: ``--level``,
``--patch-size``, ``--split-fractions``, ``--split-blocks``, ``--max-samples``), the same training loop
(``learn.train.train``, ``--lr`` / ``--weight-decay`` / ``--patience``), the same scoring as bench-models
(``learn.compare._evaluate``: test scores, worst grid orientation, equivariance error, agreement at 45°) plus,
for the image classifier, accuracy at every 15° (``bench_any_angle.any_angle_accuracy``) and, for cell types
with ``--any-angle``, the per-cell any-angle scores of ``abc-pipeline evaluate --any-angles``
(``learn.any_angle.any_angle_scores`` on the run's checkpoint, the escnn model standing in for the zoo rebuild).
Widths are solved for ``--target-params`` by the zoo's ``solve_width``. escnn caches its expanded filters in
eval mode, which changes the state_dict's keys; these models keep their convolutions in training mode (the
filter is expanded on every forward) so that checkpoints save and load in any mode. The escnn venv has numpy < 2
and so zarr 3.0, whose ``zarr.core.buffer`` is aliased as ``zarr.buffer`` for the atlas readers. Writes
``OUT/<model>/`` (training run) and ``OUT/escnn_models.tsv`` / ``.md`` (rows in the bench-models format).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_any_angle import any_angle_accuracy
from escnn import gspaces
from escnn import nn as enn
from escnn.nn import init as enn_init
from escnn.nn.modules.conv.rd_convolution import _RdConv

from abc_pipeline.fileio import atomic_write_text
from abc_pipeline.learn.checkpoint import load_checkpoint
from abc_pipeline.learn.compare import (
    SCORES,
    WORST_METRIC,
    PeakMemory,
    _evaluate,
    _stack,
    format_table,
    npz_task,
)
from abc_pipeline.learn.inference import pick_device, predict_proba
from abc_pipeline.learn.train import train
from abc_pipeline.nn.layers import parity_downsample, upsample_to
from abc_pipeline.nn.zoo import count_parameters, solve_width

log = logging.getLogger("bench_escnn_peer")
MODELS = ("escnn-o2-irrep", "escnn-d8-regular")


class _Kind:
    """Group, field types, norm and nonlinearity of one escnn model family."""

    def __init__(self, name: str, initialize: bool = True) -> None:
        self.name, self.initialize = name, initialize
        self.regular = name == "escnn-d8-regular"
        self.gs = gspaces.flipRot2dOnR2(N=8) if self.regular else gspaces.flipRot2dOnR2(N=-1, maximum_frequency=3)

    def scalars(self, n: int) -> enn.FieldType:
        return enn.FieldType(self.gs, [self.gs.trivial_repr] * n)

    def hidden(self, width: int) -> enn.FieldType:
        if self.regular:
            return enn.FieldType(self.gs, [self.gs.regular_repr] * width)
        vec = self.gs.irrep(1, 1)
        return enn.FieldType(self.gs, [self.gs.trivial_repr] * math.ceil(width / 2) + [vec] * (width // 2))

    def conv(self, a: enn.FieldType, b: enn.FieldType, kernel_size: int = 3) -> enn.R2Conv:
        conv = enn.R2Conv(a, b, kernel_size, padding=kernel_size // 2, initialize=False)
        if self.initialize:
            enn_init.generalized_he_init(conv.weights.data, conv.basisexpansion, cache=True)
        return conv

    def norm_act(self, t: enn.FieldType, scalars_only: bool = False) -> enn.SequentialModule:
        if self.regular or scalars_only:
            return enn.SequentialModule(enn.InnerBatchNorm(t), enn.ReLU(t))
        return enn.SequentialModule(enn.GNormBatchNorm(t), enn.NormNonLinearity(t, function="n_relu"))


def _down(x: enn.GeometricTensor) -> enn.GeometricTensor:
    return enn.GeometricTensor(parity_downsample(x.tensor, (True, True)), x.type)


def _up(x: enn.GeometricTensor, size) -> enn.GeometricTensor:
    return enn.GeometricTensor(upsample_to(x.tensor, size), x.type)


class _EscnnNet(torch.nn.Module):
    """Base: plain tensors in and out; convolutions kept in training mode (no cached filter, stable keys)."""

    def train(self, mode: bool = True) -> _EscnnNet:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, _RdConv):
                m.train(True)
        return self


class EscnnClassifier(_EscnnNet):
    """``(B, C, H, W) -> (B, K)`` logits."""

    def __init__(self, kind: _Kind, in_channels: int, n_classes: int, width: int, depth: int = 5) -> None:
        super().__init__()
        self.in_type = kind.scalars(in_channels)
        types = [self.in_type] + [kind.hidden(width * 2**i) for i in range(depth - 1)]
        last = width * 2 ** (depth - 1)
        types.append(kind.hidden(last) if kind.regular else kind.scalars(last))
        self.blocks = torch.nn.ModuleList(
            enn.SequentialModule(
                kind.conv(types[i], types[i + 1]), kind.norm_act(types[i + 1], scalars_only=i == depth - 1)
            )
            for i in range(depth)
        )
        self.pool = enn.GroupPooling(types[-1]) if kind.regular else enn.IdentityModule(types[-1])
        self.linear = torch.nn.Linear(self.pool.out_type.size, n_classes)
        self.first_channels = types[1].size
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = enn.GeometricTensor(x, self.in_type)
        for i, block in enumerate(self.blocks):
            h = block(h if i == 0 else _down(h))
        return self.linear(self.pool(h).tensor.mean(dim=(2, 3)))


class EscnnPatchClassifier(_EscnnNet):
    """The zoo's :class:`abc_pipeline.nn.patch.PatchClassifier` layout: ``depth`` stride-1 stages of ``width``
    fields (``same`` zero padding; the last stage invariant), the mean over the centred ``P`` window, linear.

    ``forward``: patch ``(B, C, P + 2*halo, ...)`` -> logits ``(B, K)``; ``forward_dense``: tile -> per-voxel
    logits ``(B, K, H, W)`` (linear per voxel, then the ``P`` window mean), as the zoo's for any-angle scoring.
    """

    def __init__(
        self, kind: _Kind, in_channels: int, n_classes: int, width: int, depth: int, patch_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.in_type = kind.scalars(in_channels)
        types = [self.in_type] + [kind.hidden(width)] * (depth - 1)
        types.append(kind.hidden(width) if kind.regular else kind.scalars(width))
        self.trunk = enn.SequentialModule(
            *(
                enn.SequentialModule(
                    kind.conv(types[i], types[i + 1]), kind.norm_act(types[i + 1], scalars_only=i == depth - 1)
                )
                for i in range(depth)
            )
        )
        self.pool = enn.GroupPooling(types[-1]) if kind.regular else enn.IdentityModule(types[-1])
        self.linear = torch.nn.Linear(self.pool.out_type.size, n_classes)
        self.patch_size = tuple(patch_size)
        self.halo = (depth,) * 2  # 3 x 3 kernels: one voxel per stage
        self.margin = tuple(p // 2 + h for p, h in zip(self.patch_size, self.halo))
        self.first_channels = types[1].size
        self.train()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.trunk(enn.GeometricTensor(x, self.in_type))).tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crop = [slice((n - p) // 2, (n - p) // 2 + p) for n, p in zip(x.shape[2:], self.patch_size)]
        return self.linear(self.features(x)[:, :, crop[0], crop[1]].flatten(2).mean(dim=2))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bchw,kc->bkhw", self.features(x), self.linear.weight)
        pad = tuple(p // 2 for p in self.patch_size)
        z = torch.nn.functional.avg_pool2d(z, self.patch_size, stride=1, padding=pad, count_include_pad=True)
        return z + self.linear.bias.view(1, -1, 1, 1)


class _DoubleBlock(torch.nn.Module):
    def __init__(self, kind: _Kind, a: enn.FieldType, b: enn.FieldType) -> None:
        super().__init__()
        self.conv1, self.act1 = kind.conv(a, b), kind.norm_act(b)
        self.conv2, self.act2 = kind.conv(b, b), kind.norm_act(b)
        self.out_type = b

    def forward(self, x: enn.GeometricTensor) -> enn.GeometricTensor:
        h = self.act1(self.conv1(x))
        return self.act2(self.conv2(h) + h)


class EscnnUNet(_EscnnNet):
    """``(B, C, H, W) -> (B, K, H, W)`` logits (any size, odd or even)."""

    def __init__(self, kind: _Kind, in_channels: int, n_classes: int, width: int, depth: int = 4) -> None:
        super().__init__()
        self.in_type = kind.scalars(in_channels)
        types = [kind.hidden(width * 2**i) for i in range(depth)]
        self.encoders = torch.nn.ModuleList()
        prev = self.in_type
        for t in types:
            self.encoders.append(_DoubleBlock(kind, prev, t))
            prev = t
        self.decoders = torch.nn.ModuleList()
        for t in reversed(types[:-1]):
            self.decoders.append(_DoubleBlock(kind, t + prev, t))
            prev = t
        self.head = enn.R2Conv(prev, kind.scalars(n_classes), 1)
        self.first_channels = types[0].size
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, skips = enn.GeometricTensor(x, self.in_type), []
        for i, enc in enumerate(self.encoders):
            h = enc(h if i == 0 else _down(h))
            skips.append(h)
        skips.pop()
        for dec in self.decoders:
            skip = skips.pop()
            h = dec(enn.tensor_directsum([skip, _up(h, skip.tensor.shape[2:])]))
        return self.head(h).tensor


def build(
    name: str,
    head: str,
    in_channels: int,
    n_classes: int,
    width: int,
    initialize: bool = True,
    depth: int = 4,
    patch_size: tuple[int, int] = (5, 5),
) -> _EscnnNet:
    """An escnn model for the :class:`BenchTask` ``head`` (``classify``, ``segment`` or ``patch``: ``depth``
    stages, window ``patch_size``); ``initialize=False`` skips the (slow) He initialisation, for counting."""
    kind = _Kind(name, initialize)
    if head == "classify":
        net = EscnnClassifier(kind, in_channels, n_classes, width)
    elif head == "patch":
        net = EscnnPatchClassifier(kind, in_channels, n_classes, width, depth, patch_size)
    else:
        net = EscnnUNet(kind, in_channels, n_classes, width)
    net.name, net.task, net.width = name, "segment" if head == "segment" else "classify", width
    net.n_params = count_parameters(net)
    return net


def _count_on_cpu(*args, **kwargs) -> torch.nn.Module:
    """:func:`build` without initialisation on the CPU (escnn cannot build on the meta device that the zoo's
    ``solve_width`` counts on)."""
    with torch.device("cpu"):
        return build(*args, initialize=False, **kwargs)


def _zarr_compat() -> None:
    """The escnn venv keeps numpy < 2 (escnn's compiled dependencies), hence zarr 3.0, which has
    ``zarr.buffer`` as ``zarr.core.buffer`` only (moved in 3.1); alias it for abc_pipeline's readers."""
    try:
        import zarr.buffer.cpu  # noqa: F401
    except ModuleNotFoundError:
        import sys

        import zarr.core.buffer
        import zarr.core.buffer.cpu

        sys.modules["zarr.buffer"], sys.modules["zarr.buffer.cpu"] = zarr.core.buffer, zarr.core.buffer.cpu


def _atlas_task(a: argparse.Namespace):
    """The bench-models ``--raster`` task: region U-Net tiles, or celltype patches (patch classifier)."""
    _zarr_compat()
    from abc_pipeline.learn.atlas import atlas_task

    data = {"level": a.level, "split_fractions": a.split_fractions, "split_blocks": a.split_blocks}
    data = {k: v for k, v in data.items() if v is not None}  # None: the library's defaults
    if a.task == "region":
        return atlas_task(a.raster, a.cells, "region", dim=2, tile_size=a.tile_size, seed=a.seed, **data)
    return atlas_task(
        a.raster,
        a.cells,
        "celltype",
        dim=2,
        patch_size=a.patch_size,
        depth=a.depth,
        max_samples=a.max_samples,
        seed=a.seed,
        **data,
    )


def _any_angle(model: torch.nn.Module, run_dir: Path, raster: Path, cells: Path, dev: torch.device) -> dict:
    """Per-cell any-angle scores (``abc-pipeline evaluate --any-angles``: ``learn.any_angle.any_angle_scores``
    on the run's checkpoint), with this in-memory model in place of the zoo rebuild from the checkpoint."""
    from unittest import mock

    from abc_pipeline.learn import any_angle

    def load(path, device):
        ckpt = load_checkpoint(path)
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval(), ckpt

    with mock.patch.object(any_angle, "load_model", load):
        return any_angle.any_angle_scores(run_dir / "checkpoint.pt", raster, cells, device=dev.type)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--npz", help="MedMNIST-format .npz (classification)")
    data.add_argument("--raster", type=Path, help="atlas raster (2D sections): --task region or celltype")
    ap.add_argument("--cells", type=Path, default=None, help="the cells.zarr of the raster")
    ap.add_argument("--task", choices=("region", "celltype"), default="region", help="atlas task (with --raster)")
    ap.add_argument("--level", default=None, help="label level (default: the library's per task)")
    ap.add_argument("--tile-size", type=int, default=64, help="region tiles")
    ap.add_argument("--patch-size", type=int, default=5, help="celltype: the window P (odd)")
    ap.add_argument("--depth", type=int, default=4, help="celltype: stages of the patch classifier")
    ap.add_argument("--max-samples", type=int, default=None, help="celltype: cap the cells of every split")
    ap.add_argument("--split-fractions", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--split-blocks", type=int, default=None)
    ap.add_argument("--any-angle", action="store_true", help="celltype: per-cell any-angle scores (evaluate's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--target-params", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--angles", type=float, nargs="+", default=[0, 15, 30, 45, 60, 75, 90])
    ap.add_argument("--curve-samples", type=int, default=256)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")

    task = npz_task(a.npz) if a.npz is not None else _atlas_task(a)
    shape = {"depth": a.depth, "patch_size": (a.patch_size,) * 2} if task.head == "patch" else {}
    dev = pick_device("auto")
    x_test, y_test = _stack(task.test)
    k = len(task.class_names)
    rows = []
    for name in a.models:
        torch.manual_seed(a.seed)
        width = solve_width(
            lambda w, n=name: _count_on_cpu(n, task.head, task.in_channels, k, w, **shape), a.target_params
        )
        torch.manual_seed(a.seed)
        model = build(name, task.head, task.in_channels, k, width, **shape)
        with PeakMemory(dev) as memory:
            result = train(
                model,
                task.train,
                task.val,
                a.out / name,
                class_names=task.class_names,
                epochs=a.epochs,
                batch_size=a.batch_size,
                lr=a.lr,
                weight_decay=a.weight_decay,
                patience=a.patience,
                seed=a.seed,
                device=dev,
                progress=False,
                config={**task.config, "target_params": a.target_params, "width": width},
                resume="if-unchanged",
            )
        ev = _evaluate(model, task, x_test, y_test, dev, a.batch_size, a.angles, a.curve_samples, 16)
        worst = WORST_METRIC[task.objective]
        row = {
            "model": name,
            "width": width,
            "first_layer_channels": model.first_channels,
            "params": model.n_params,
            **{s: ev["test"][s] for s in SCORES[task.objective]},
            f"worst_{worst}": ev["orientation"]["worst"],
            "equivariance_error": ev["equivariance_error"],
            "agreement_45deg": ev["curve"]["agreement"][a.angles.index(45.0)],
            "seconds_per_epoch": float(np.mean([h["seconds"] for h in result.history])),
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "peak_memory_mb": memory.mib,
            "memory": memory.kind,
        }
        if task.objective == "classify" and task.head == "classify":
            model.eval()
            scores = any_angle_accuracy(
                lambda v, m=model: predict_proba(m, v, device=dev), x_test, y_test, np.arange(0.0, 360.0, 15.0)
            )
            row.update(
                any_angle_mean=scores["mean"], any_angle_worst=scores["worst"], any_angle_worst_at=scores["worst_angle"]
            )
        if task.head == "patch" and a.any_angle:
            s = _any_angle(model, a.out / name, a.raster, a.cells, dev)
            row.update(
                any_angle_cells=s["n_cells"],
                any_angle_at_0=s["metrics"]["accuracy"][s["angles"].index(0.0)],
                any_angle_mean=s["mean"]["accuracy"],
                any_angle_worst=s["worst"]["accuracy"],
                any_angle_worst_at=s["worst_angle"]["accuracy"],
                any_angle_worst_balanced=s["worst"]["balanced_accuracy"],
            )
        log.info("%s: %s", name, row)
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_text(a.out / "escnn_models.tsv", table.to_csv(sep="\t", index=False, float_format="%.6g"))
    extra = ""
    if "any_angle_worst" in table:
        extra = "\n\nAny angle (0-345° in 15° steps): " + ", ".join(
            f"{r.model} mean {r.any_angle_mean:.3f}, worst {r.any_angle_worst:.3f} at {r.any_angle_worst_at:g}°"
            for r in table.itertuples()
        )
    text = f"escnn models on {task.name} ({task.objective}).\n\n{format_table(table)}{extra}\n"
    atomic_write_text(a.out / "escnn_models.md", text)
    print(text)


if __name__ == "__main__":
    main()
