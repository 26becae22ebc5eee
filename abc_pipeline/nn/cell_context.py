"""Per-cell classifier from the cell's own expression fused with the invariant summaries of its neighbourhood.

``CellContextClassifier`` (``build_model(..., head="cell-context", n_expression=F)``):

- **own expression**: the cell's own channel values ``e`` ``(B, F)`` (the raster's channel definition applied
  to the cell: gene channels or PCA scores), standardised with the training cells' mean/std (buffers
  ``expression_mean`` / ``expression_std``), through a two-layer MLP (``hidden`` units, ReLU);
- **neighbourhood means**: :class:`abc_pipeline.nn.neighborhood.NeighborhoodMeans`, the tissue-weighted mean
  of the (normalised) raster features over discs of ``neighborhood_radii`` (units of the smallest voxel side)
  around the cell's voxel and its tissue fraction, ``(F + 1) * R`` values, through a one-layer MLP (``hidden // 2`` units);
- **context**: a :class:`abc_pipeline.nn.patch.PatchClassifier` of the zoo family (stride-1 trunk over the
  raster patch centred on the cell's voxel, mean over the centred ``P`` window, linear) whose output is an
  ``embed``-dimensional *invariant* context embedding instead of class logits;
- **head**: ``[mlp(e), mlp(means), context]`` -> linear -> ReLU -> linear, plus a **linear path**: a linear map
  of ``[e, means]`` straight to the logits. A logistic regression on the cell's own expression and its
  neighbourhood means is the special case of zero head weights; training starts there
  (:func:`abc_pipeline.learn.cell_context.fit_linear_path` fits that regression and :meth:`set_linear_path`
  loads it), so the network learns what the context adds to the baseline a scientist runs first.

The expression is a set of scalars of the cell (it does not move with the grid), the neighbourhood means are
exactly invariant (symmetric discs) and the context embedding is exactly invariant for the moment and
group-CNN families, so the whole classifier is exactly invariant to the grid group
(:func:`abc_pipeline.nn.fields.grid_group`) for those families; with the ``cnn`` family only the expression
and neighbourhood paths are.

Modes:

- ``forward(patch, expression)``: ``patch`` ``(B, C_in, *(P + 2*halo))`` (the normalised raster window, last
  channel = tissue), ``expression`` ``(B, F)`` raw channel values -> logits ``(B, K)``;
  ``forward(images, expression, cells)``: whole images and each cell's ``(image, *voxel)``: the same logits
  from one dense pass per image (efficient training on whole sections, every cell of them).
- ``context_dense(tile)`` -> ``(B, context_channels, *spatial)`` per voxel: the context embedding of the patch
  centred there (:meth:`PatchClassifier.forward_dense`) followed by the neighbourhood means;
  ``cell_logits(context, expression)`` -> ``(N, K)`` for cells whose context was gathered at their voxel:
  the same arithmetic as ``forward``.
- ``forward_dense(tile)`` -> ``(B, K, *spatial)``: every voxel classified as its *mean cell* (the voxel mean
  expression, recovered from the normalised raster input with the buffers ``voxel_mean`` / ``voxel_std``,
  standardised like a cell's), for the dense probability map; per-cell predictions use ``cell_logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from abc_pipeline.errors import InputError
from abc_pipeline.nn.neighborhood import NeighborhoodMeans
from abc_pipeline.nn.patch import PatchClassifier

DEFAULT_EMBED = 16
DEFAULT_HIDDEN = 64
#: disc radii of the neighbourhood means per raster dimensionality, in units of the smallest voxel side. 2D:
#: 0.15-2.4 mm on a 0.1 mm grid (the wide discs place a cell in its brain division; a section's means are
#: computed once per section); 3D: the three narrow ones (a 3D cell's patch carries the largest disc's reach
#: along every axis, so a 2.4 mm ball would make each patch ~50^3 voxels)
DEFAULT_NEIGHBORHOOD_RADII = {2: (1.5, 3.0, 6.0, 12.0, 24.0), 3: (1.5, 3.0, 6.0)}


class CellContextClassifier(nn.Module):
    """Own-expression MLP + neighbourhood means + invariant context trunk + fusion head + linear path; see
    the module docstring.

    ``family``: a zoo family (``abc_pipeline.nn.zoo._Family``); ``in_channels``: raster input channels
    (features + tissue); ``n_expression``: ``F``, the feature channels (``in_channels - 1``);
    ``neighborhood_radii``: disc radii (units of the smallest voxel side; empty: no neighbourhood means;
    :func:`abc_pipeline.nn.build_model` gives :data:`DEFAULT_NEIGHBORHOOD_RADII` of the dimensionality); the
    input margin (``P // 2 + halo`` per axis) covers the trunk's receptive field and the largest disc.
    """

    def __init__(
        self,
        family,
        in_channels: int,
        n_expression: int,
        n_classes: int,
        width: int,
        depth: int,
        spacing: tuple[float, ...],
        patch_size: int | Sequence[int],
        neighborhood_radii: Sequence[float],
        embed: int = DEFAULT_EMBED,
        hidden: int = DEFAULT_HIDDEN,
    ) -> None:
        super().__init__()
        if n_expression != in_channels - 1:
            raise InputError(
                f"n_expression must be the raster's feature channels (in_channels - 1 = "
                f"{in_channels - 1}), got {n_expression}"
            )
        self.dim, self.n_expression = family.dim, n_expression
        self.context = PatchClassifier(family, in_channels, embed, width, depth, spacing, patch_size)
        self.embed = embed
        self.neighborhood = (
            NeighborhoodMeans(n_expression, neighborhood_radii, spacing) if len(neighborhood_radii) else None
        )
        n_means = self.neighborhood.out_channels if self.neighborhood is not None else 0
        self.expression = nn.Sequential(
            nn.Linear(n_expression, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.means = nn.Sequential(nn.Linear(n_means, hidden // 2), nn.ReLU()) if n_means else None
        fused = hidden + embed + (hidden // 2 if n_means else 0)
        self.head = nn.Sequential(nn.Linear(fused, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
        self.linear = nn.Linear(n_expression + n_means, n_classes)
        for name, value in (("expression_mean", 0.0), ("expression_std", 1.0), ("voxel_mean", 0.0), ("voxel_std", 1.0)):
            self.register_buffer(name, torch.full((n_expression,), value))
        self.first_spec = self.context.first_spec
        self.patch_size = self.context.patch_size
        #: voxels of input around the ``P`` window per side each axis: the trunk's receptive field, or more
        #: where the largest neighbourhood disc reaches further (the trunk ignores voxels beyond its own)
        reach = self.neighborhood.margin if self.neighborhood is not None else (0,) * self.dim
        self.halo = tuple(max(h, r - p // 2) for h, r, p in zip(self.context.halo, reach, self.patch_size))

    @property
    def margin(self) -> tuple[int, ...]:
        """Input context per side of a voxel: ``P // 2 + halo`` per axis."""
        return tuple(p // 2 + h for p, h in zip(self.patch_size, self.halo))

    @property
    def context_channels(self) -> int:
        """Channels of :meth:`context_dense`: the context embedding, then the neighbourhood means."""
        return self.embed + (self.neighborhood.out_channels if self.neighborhood is not None else 0)

    @property
    def input_size(self) -> tuple[int, ...]:
        """Patch size ``P + 2 * halo`` per axis that :meth:`forward` expects."""
        return tuple(p + 2 * h for p, h in zip(self.patch_size, self.halo))

    def set_normalization(
        self, expression_mean: np.ndarray, expression_std: np.ndarray, voxel_mean: np.ndarray, voxel_std: np.ndarray
    ) -> None:
        """Store the cells' expression statistics and the raster's input normalisation (``(F,)`` each)."""
        for name, value in (
            ("expression_mean", expression_mean),
            ("expression_std", expression_std),
            ("voxel_mean", voxel_mean),
            ("voxel_std", voxel_std),
        ):
            buf = getattr(self, name)
            buf.copy_(torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=buf.dtype))

    def _standardize(self, expression: torch.Tensor) -> torch.Tensor:
        if expression.ndim != 2 or expression.shape[1] != self.n_expression:
            raise InputError(f"expected expression (N, {self.n_expression}), got shape {tuple(expression.shape)}")
        return (expression - self.expression_mean) / self.expression_std

    def linear_inputs(self, context: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """The linear path's inputs ``(N, F + (F + 1) * R)``: standardised expression, then the neighbourhood means
        (the tail of ``context`` ``(N, context_channels)``)."""
        return torch.cat([self._standardize(expression), context[:, self.embed :]], dim=1)

    def set_linear_path(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Load a linear classifier of :meth:`linear_inputs` (``weight`` ``(K, F + (F + 1) * R)``, ``bias`` ``(K,)``)
        into the linear path, and shrink the head's output layer tenfold so the network starts as that
        classifier (plus a small learned correction)."""
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(np.asarray(weight), dtype=self.linear.weight.dtype))
            self.linear.bias.copy_(torch.as_tensor(np.asarray(bias), dtype=self.linear.bias.dtype))
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()

    def cell_logits(self, context: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Context ``(N, context_channels)`` at the cells' voxels + their raw expression ``(N, F)`` -> ``(N, K)``."""
        e = self._standardize(expression)
        embedding, means = context[:, : self.embed], context[:, self.embed :]
        parts = [self.expression(e), embedding] + ([self.means(means)] if self.means is not None else [])
        return self.head(torch.cat(parts, dim=1)) + self.linear(torch.cat([e, means], dim=1))

    def forward(
        self,
        x: torch.Tensor,
        expression: torch.Tensor,
        cells: torch.Tensor | None = None,
        means: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(N, K)`` of cells given their raw expression ``(N, F)``, in one of two modes:

        - ``cells`` None: ``x`` ``(N, C_in, *(P + 2*halo))`` holds one patch centred on each cell;
        - ``cells`` ``(N, 1 + dim)`` int64 ``(image, *voxel)``: ``x`` ``(B, C_in, *spatial)`` holds whole images
          (sections) and each cell reads the dense context at its voxel of its image: computed once
          per image instead of once per cell, and equal to its patch's for voxels at least ``margin`` inside
          the image (pad images with ``margin`` zero voxels to reproduce the zero-padded patches at borders).
          ``means``: the cells' neighbourhood means ``(N, (F + 1) * R)`` when already known
          (:meth:`neighborhood_at` of the same images; they are fixed, so a training run computes them once).
        """
        return self.cell_logits(self.cell_context(x, cells, means), expression)

    def cell_context(
        self, x: torch.Tensor, cells: torch.Tensor | None = None, means: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The context ``(N, context_channels)`` of each cell, in the two modes of :meth:`forward`."""
        if cells is None:
            parts = [self.context(x)]
            if self.neighborhood is not None:
                centre = tuple(n // 2 for n in x.shape[2:])
                parts.append(self.neighborhood(x)[(slice(None), slice(None), *centre)])
            return torch.cat(parts, dim=1)
        image, voxels = cells[:, 0], cells[:, 1:]
        # the trunk reads only its own receptive field: run it on the images less the discs' extra margin
        trim = [h - trunk for h, trunk in zip(self.halo, self.context.halo)]
        inner = x[(slice(None), slice(None), *(slice(t, n - t) for t, n in zip(trim, x.shape[2:])))]
        inner_voxels = voxels - torch.as_tensor(trim, dtype=voxels.dtype, device=voxels.device)
        parts = [self.context.forward_dense(inner).movedim(1, -1)[(image, *inner_voxels.T)]]
        if self.neighborhood is not None:
            parts.append(self.neighborhood_at(x, cells) if means is None else means)
        return torch.cat(parts, dim=1)

    def neighborhood_at(self, x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Neighbourhood means ``(N, (F + 1) * R)`` of whole images ``x`` ``(B, C_in, *spatial)`` at the cells'
        ``(image, *voxel)`` ``(N, 1 + dim)``."""
        if self.neighborhood is None:
            raise InputError("this model has no neighbourhood means (neighborhood_radii is empty)")
        return self.neighborhood(x).movedim(1, -1)[(cells[:, 0], *cells[:, 1:].T)]

    def context_dense(self, tile: torch.Tensor) -> torch.Tensor:
        """Tile ``(B, C_in, *spatial)`` -> context of every voxel ``(B, context_channels, *spatial)``."""
        embedding = self.context.forward_dense(tile)
        if self.neighborhood is None:
            return embedding
        return torch.cat([embedding, self.neighborhood(tile)], dim=1)

    def forward_dense(self, tile: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Tile ``(B, C_in, *spatial)`` -> logits ``(B, K, *spatial)`` of each voxel's mean cell (``context``:
        the tile's :meth:`context_dense`, when already computed)."""
        shape = (1, -1) + (1,) * self.dim
        voxel = tile[:, : self.n_expression] * self.voxel_std.view(shape) + self.voxel_mean.view(shape)
        expression = torch.where(tile[:, -1:] > 0, voxel, self.expression_mean.view(shape))
        flat = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1])  # noqa: E731
        context = self.context_dense(tile) if context is None else context
        logits = self.cell_logits(flat(context), flat(expression))
        return logits.reshape(tile.shape[0], *tile.shape[2:], -1).movedim(-1, 1)
