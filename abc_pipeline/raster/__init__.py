"""Rasterization of cells into multichannel 2D/3D OME-Zarr grids (docs/raster.md).

Public API
----------
``rasterize(cells_path, out_path, ...) -> Path``   cells.zarr -> ``<raster>.ome.zarr`` (Dask, bounded memory)
``open_raster(path) -> Raster``                    lazy reader: image (c, z, y, x), labels, grid, voxel index
``Grid``                                           coordinate space, origin, voxel size, shape; coords <-> voxels
"""

from abc_pipeline.raster.grid import Grid
from abc_pipeline.raster.ome import LabelVolume, Raster, open_raster
from abc_pipeline.raster.rasterize import rasterize

__all__ = ["Grid", "LabelVolume", "Raster", "open_raster", "rasterize"]
