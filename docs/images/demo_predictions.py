"""Regenerate docs/images/demo_predictions.png from the demo's annotated AnnData (after `make demo`).

Usage: .venv/bin/python docs/images/demo_predictions.py [results/MERFISH-C57BL6J-638850/cells_annotated.h5ad]

Plots one held-out (test) section with squidpy: true cell class, predicted cell class, true and predicted brain
division, as a user would in a notebook.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import scanpy as sc  # noqa: E402
import squidpy as sq  # noqa: E402

H5AD = Path(sys.argv[1] if len(sys.argv) > 1 else "results/MERFISH-C57BL6J-638850/cells_annotated.h5ad")
OUT = Path(__file__).with_suffix(".png")

adata = sc.read_h5ad(H5AD)
test_sections = adata.obs.loc[adata.obs["split"] == "test", "brain_section_label"].value_counts()
section = test_sections.index[0]  # the test section with the most cells
view = adata[adata.obs["brain_section_label"] == section].copy()
sq.pl.spatial_scatter(
    view,
    shape=None,
    library_key="brain_section_label",
    size=6,
    ncols=2,
    wspace=0.35,
    color=["class", "pred_celltype", "parcellation_division", "pred_region"],
    title=[f"true class ({section})", "predicted class", "true division", "predicted division"],
)
plt.savefig(OUT, dpi=90, bbox_inches="tight")
print(f"wrote {OUT}")
