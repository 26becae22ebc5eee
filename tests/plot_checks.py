"""What a squidpy spatial scatter of an annotated AnnData must show, shared by the annotate, workflow and plot tests
(a helper module, not a test file)."""

from __future__ import annotations

import anndata
import numpy as np


def check_spatial_scatter(adata: anndata.AnnData, color: str, library_key: str | None = None, **kwargs) -> None:
    """Draw ``adata.obs[color]`` (categorical, colours in ``uns['<color>_colors']``) with
    ``squidpy.pl.spatial_scatter`` and assert what the figure shows.

    One panel per category of ``obs[library_key]`` (one panel without ``library_key``), in category order; each
    panel draws its cells at their ``obsm['spatial']`` (x, y) positions, a cell with a value in its category's
    colour; its legend lists the categories of ``color`` present in the panel, in category order (and ``NA`` when
    some of its cells have none).
    ``kwargs`` go to ``spatial_scatter`` (e.g. ``ax``). Closes the figures it drew.
    """
    import matplotlib

    matplotlib.use("Agg")
    import squidpy as sq
    from matplotlib import pyplot as plt
    from matplotlib.colors import to_rgba_array

    column = adata.obs[color]
    palette = dict(zip(column.cat.categories, adata.uns[f"{color}_colors"]))
    libraries = [None] if library_key is None else list(adata.obs[library_key].cat.categories)
    try:
        axes = sq.pl.spatial_scatter(adata, shape=None, library_key=library_key, color=color, return_ax=True, **kwargs)
        axes = list(np.ravel(axes))
        assert len(axes) == len(libraries), f"{len(axes)} panels for {len(libraries)} libraries"
        for ax, library in zip(axes, libraries):
            cells = np.ones(adata.n_obs, bool) if library is None else (adata.obs[library_key] == library).to_numpy()
            points = max(ax.collections, key=lambda c: len(c.get_offsets()))  # the legend's handles are empty
            np.testing.assert_allclose(points.get_offsets(), adata.obsm["spatial"][cells, :2])
            values = column[cells]
            has = values.notna().to_numpy()
            expected = to_rgba_array([palette[v] for v in values[has]])
            np.testing.assert_allclose(points.get_facecolors()[has, :3], expected[:, :3], atol=1e-6)
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            present = [c for c in column.cat.categories if (values == c).any()]
            assert legend == present + ([] if has.all() else ["NA"]), (library, legend)
    finally:
        plt.close("all")
