"""Equivariant networks on voxel grids: moment-kernel layers, baselines and the model zoo (docs/nn.md).

- :class:`MomentConv` — the moment-kernel convolution (2D/3D, scalar/vector/matrix fields, physical spacing).
- :mod:`.layers` — field nonlinearity, field batch norm, parity-aware down/upsampling, heads.
- :mod:`.baselines` — regular-representation group convolution, CFNet's conic convolution.
- :mod:`.se2n` — SE(2,N) group convolution with filters rotated by interpolation (zoo model ``se2n-interp``).
- :func:`build_model`, :func:`model_table` — the zoo with parameter-matched widths; :class:`ModelSpec` — every
  argument that rebuilds a zoo network (stored in checkpoints).
- :mod:`.fields` — the channel layout and the grid symmetry group (``grid_group``, ``transform``).
"""

from abc_pipeline.nn import fields
from abc_pipeline.nn.fields import GridSymmetry, grid_group, n_channels, transform
from abc_pipeline.nn.layers import FieldBatchNorm, FieldNonlinearity, ParityDownsample, upsample_to
from abc_pipeline.nn.moment import MomentConv
from abc_pipeline.nn.zoo import HEADS, MODELS, ModelSpec, build_model, count_parameters, format_model_table, model_table

__all__ = [
    "HEADS",
    "MODELS",
    "ModelSpec",
    "FieldBatchNorm",
    "FieldNonlinearity",
    "GridSymmetry",
    "MomentConv",
    "ParityDownsample",
    "build_model",
    "count_parameters",
    "fields",
    "format_model_table",
    "grid_group",
    "model_table",
    "n_channels",
    "transform",
    "upsample_to",
]
