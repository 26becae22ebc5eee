"""Per-cell classifier from the cell's own expression fused with the invariant embedding of its neighbourhood.

``CellContextClassifier`` (``build_model(..., head="cell-context", n_expression=F)``):

- **own expression**: the cell's own channel values ``e`` ``(B, F)`` (the raster's channel definition applied
  to the cell: gene channels or PCA scores), standardised with the training cells' mean/std (buffers
  ``expression_mean`` / ``expression_std``), through a two-layer MLP (``hidden`` units, ReLU);
- **context**: a :class:`abc_pipeline.nn.patch.PatchClassifier` of the zoo family (stride-1 trunk over the
  raster patch centred on the cell's voxel, mean over the centred ``P`` window, linear) whose output is an
  ``embed``-dimensional *invariant* context embedding instead of class logits;
- **head**: ``[mlp(e), context]`` -> linear -> ReLU -> linear, plus a linear map of the standardised
  expression straight to the logits (a logistic regression on the cell's own expression is the special case
  of zero MLP/context weights) -> logits ``(B, n_classes)``.

The expression is a set of scalars of the cell (it does not move with the grid) and the context embedding is
exactly invariant for the moment and group-CNN families, so the whole classifier is exactly invariant to
the grid group (:func:`abc_pipeline.nn.fields.grid_group`) for those families; with the ``cnn`` family only
the expression path is.

Modes:

- ``forward(patch, expression)``: ``patch`` ``(B, C_in, *(P + 2*halo))`` (the normalised raster window, last
  channel = tissue), ``expression`` ``(B, F)`` raw channel values -> logits ``(B, K)``;
  ``forward(images, expression, cells)``: whole images and each cell's ``(image, *voxel)``: the same logits
  from one dense pass per image (efficient training on whole sections, every cell of them).
- ``context_dense(tile)`` -> embedding maps ``(B, embed, *spatial)`` (:meth:`PatchClassifier.forward_dense`:
  the embedding of the patch centred at every voxel); ``cell_logits(embedding, expression)`` -> ``(N, K)``
  for cells whose embedding was gathered at their voxel: the same arithmetic as ``forward``.
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
from abc_pipeline.nn.patch import PatchClassifier

DEFAULT_EMBED = 16
DEFAULT_HIDDEN = 64


class CellContextClassifier(nn.Module):
    """Own-expression MLP + invariant context trunk + fusion head; see the module docstring.

    ``family``: a zoo family (``abc_pipeline.nn.zoo._Family``); ``in_channels``: raster input channels
    (features + tissue); ``n_expression``: ``F``, the feature channels (``in_channels - 1``).
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
        self.expression = nn.Sequential(
            nn.Linear(n_expression, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Linear(hidden + embed, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
        self.skip = nn.Linear(n_expression, n_classes, bias=False)
        for name, value in (("expression_mean", 0.0), ("expression_std", 1.0), ("voxel_mean", 0.0), ("voxel_std", 1.0)):
            self.register_buffer(name, torch.full((n_expression,), value))
        self.first_spec = self.context.first_spec
        self.patch_size, self.halo = self.context.patch_size, self.context.halo

    @property
    def margin(self) -> tuple[int, ...]:
        """Input context per side of a voxel: ``P // 2 + halo`` per axis."""
        return self.context.margin

    @property
    def input_size(self) -> tuple[int, ...]:
        """Patch size ``P + 2 * halo`` per axis that :meth:`forward` expects."""
        return self.context.input_size

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

    def cell_logits(self, embedding: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Context embeddings ``(N, embed)`` at the cells' voxels + their raw expression ``(N, F)`` -> ``(N, K)``."""
        if expression.ndim != 2 or expression.shape[1] != self.n_expression:
            raise InputError(f"expected expression (N, {self.n_expression}), got shape {tuple(expression.shape)}")
        e = (expression - self.expression_mean) / self.expression_std
        return self.head(torch.cat([self.expression(e), embedding], dim=1)) + self.skip(e)

    def forward(self, x: torch.Tensor, expression: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(N, K)`` of cells given their raw expression ``(N, F)``, in one of two modes:

        - ``cells`` None: ``x`` ``(N, C_in, *(P + 2*halo))`` holds one patch centred on each cell;
        - ``cells`` ``(N, 1 + dim)`` int64 ``(image, *voxel)``: ``x`` ``(B, C_in, *spatial)`` holds whole images
          (sections) and each cell reads the dense context embedding at its voxel of its image: computed once
          per image instead of once per cell, and equal to its patch's for voxels at least ``margin`` inside
          the image (pad images with ``margin`` zero voxels to reproduce the zero-padded patches at borders).
        """
        if cells is None:
            return self.cell_logits(self.context(x), expression)
        embedding = self.context_dense(x)
        return self.cell_logits(embedding.movedim(1, -1)[tuple(cells.T)], expression)

    def context_dense(self, tile: torch.Tensor) -> torch.Tensor:
        """Tile ``(B, C_in, *spatial)`` -> context embedding of every voxel ``(B, embed, *spatial)``."""
        return self.context.forward_dense(tile)

    def forward_dense(self, tile: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Tile ``(B, C_in, *spatial)`` -> logits ``(B, K, *spatial)`` of each voxel's mean cell (``embedding``:
        the tile's :meth:`context_dense`, when already computed)."""
        shape = (1, -1) + (1,) * self.dim
        voxel = tile[:, : self.n_expression] * self.voxel_std.view(shape) + self.voxel_mean.view(shape)
        expression = torch.where(tile[:, -1:] > 0, voxel, self.expression_mean.view(shape))
        flat = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1])  # noqa: E731
        embedding = self.context_dense(tile) if embedding is None else embedding
        logits = self.cell_logits(flat(embedding), flat(expression))
        return logits.reshape(tile.shape[0], *tile.shape[2:], -1).movedim(-1, 1)
