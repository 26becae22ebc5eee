"""Synthetic ABC Atlas release: the real bucket layout, manifest, CSV columns and h5ad layout, simulated content.

``write_synthetic_release(out, n_cells)`` writes, under ``out``, the files the MERFISH-C57BL6J-638850 dataset
profile downloads, at the relative paths of the real release 20250531, plus ``releases/<release>/manifest.json``
with every file's true size and MD5. The content comes from :class:`~abc_pipeline.atlas.synthetic_model.BrainModel`:
real taxonomy, parcellation, section z and gene panel, cells placed by the real clusters' CCF frequencies, and a
MERFISH measurement model calibrated on real cells (``docs/synthetic_atlas.md``).

Layout (as in the real release; see ``../shared/reference/abc_atlas_release.md``):

* ``C57BL6J-638850-{raw,log2}.h5ad``: CSR ``X`` (float64, n_cells x 550, indptr over cells), raw = integer counts,
  log2 = log2(counts per volume + 1), same sparsity pattern; ``obs`` index ``cell_label`` with categorical
  ``brain_section_label``; ``var`` index ``gene_identifier`` with ``gene_symbol``, ``transcript_identifier``;
  ``uns`` ``accessed_on``, ``src``.
* ``cell_metadata.csv``: section coordinates (mm): the reconstructed x, y under a per-section rigid in-plane
  transform, z = the section's z (some written over-precise, e.g. ``5.7999999``). Cells whose
  ``average_correlation_score`` < 0.5 are left out (they stay in the h5ad), as in the real QC.
* ``reconstructed_coordinates.csv`` (true 3D positions, mm) and ``ccf_coordinates.csv`` (an affine map into CCF
  ranges: x AP 0-13.2, y DV 0-8, z LR 0-11.4): about 3 % of the metadata cells, and every cell of sections
  ``.01-.04`` and ``.68-.69``, have no rows, as in the real release.
* WMB-taxonomy and Allen-CCF-2020 ``views/`` tables: the real names (a seed-chosen subset of clusters for a small
  atlas), the real 688 parcels and their colours, generated mixed-case ``#RRGGBB`` taxonomy colours.

Generation streams: cells are simulated in blocks of at most 8,192 cells of one section (each block has its own
random stream derived from ``(seed, section, block)``), and blocks are gathered into chunks of about
``chunk_cells`` cells that are appended to the CSVs and h5ad files. Peak memory is therefore set by
``chunk_cells`` (measured: about 0.3 GB + 4.5 kB per chunk cell, i.e. 1.2 GB at 200,000), not by ``n_cells``.
The same arguments give byte-identical files; ``chunk_cells`` changes only the HDF5 chunking of the h5ad files,
not the CSVs or any value.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem
from tqdm.auto import tqdm

from abc_pipeline.atlas.synthetic_geometry import BrainGeometry
from abc_pipeline.atlas.synthetic_model import (
    TAXONOMY_LEVELS,
    BrainModel,
    CellBlock,
    default_n_clusters,
)
from abc_pipeline.atlas.synthetic_tables import (
    SECTION_NUMBERS,
    SECTIONS_WITHOUT_CCF,
    section_z,
)
from abc_pipeline.errors import InputError
from abc_pipeline.fileio import file_md5, staged_output

log = logging.getLogger(__name__)

BUCKET_URL = "https://allen-brain-cell-atlas.s3.us-west-2.amazonaws.com/"
RESOURCE_URI = "s3://allen-brain-cell-atlas/"
MERFISH = "MERFISH-C57BL6J-638850"
BLOCK_CELLS = 8192  # cells simulated per random stream (and per dense expression temporary)
FEATURE_MATRIX = "C57BL6J-638850"

# (directory, data_kind, version, file name) of every file written; relative path = kind/directory/version/name.
RELEASE_FILES: tuple[tuple[str, str, str, str], ...] = (
    (MERFISH, "expression_matrices", "20230830", "C57BL6J-638850-raw.h5ad"),
    (MERFISH, "expression_matrices", "20230830", "C57BL6J-638850-log2.h5ad"),
    (MERFISH, "metadata", "20241115", "cell_metadata.csv"),
    (MERFISH, "metadata", "20241115", "gene.csv"),
    (f"{MERFISH}-CCF", "metadata", "20231215", "reconstructed_coordinates.csv"),
    (f"{MERFISH}-CCF", "metadata", "20231215", "ccf_coordinates.csv"),
    ("WMB-taxonomy", "metadata", "20231215", "views/cluster_to_cluster_annotation_membership_pivoted.csv"),
    ("WMB-taxonomy", "metadata", "20231215", "views/cluster_to_cluster_annotation_membership_color.csv"),
    ("Allen-CCF-2020", "metadata", "20230630", "views/parcellation_to_parcellation_term_membership_acronym.csv"),
    ("Allen-CCF-2020", "metadata", "20230630", "views/parcellation_to_parcellation_term_membership_color.csv"),
)
CELL_METADATA_COLUMNS = [
    "cell_label",
    "brain_section_label",
    "cluster_alias",
    "average_correlation_score",
    "feature_matrix_label",
    "donor_label",
    "donor_genotype",
    "donor_sex",
    "x",
    "y",
    "z",
    "abc_sample_id",
]
COORDINATE_COLUMNS = ["cell_label", "x", "y", "z", "parcellation_index"]
PARCELLATION_LEVELS = ("organ", "category", "division", "structure", "substructure")

# Reconstructed (x LR, y DV, z AP 0-14.6; mm) -> CCF (x AP 0-13.2, y DV, z LR; mm): axis swap, scale, pitch and offset.
CCF_AFFINE = np.array(
    [
        [0.0, 0.05, 0.85],
        [0.0, 0.98, -0.02],
        [1.02, 0.0, 0.0],
    ]
)
CCF_OFFSET = np.array([6.6, 4.0, 5.7]) - CCF_AFFINE @ np.array([5.5, 5.3, 7.3])
_SECTION_CENTER = np.array([5.5, 5.5])  # rotation centre of the section transforms, mm


def relative_path(directory: str, kind: str, version: str, name: str) -> str:
    """Bucket key of a release file: ``<kind>/<directory>/<version>/<name>``."""
    return f"{kind}/{directory}/{version}/{name}"


def default_n_sections(n_cells: int) -> int:
    """Sections for ``n_cells``: about 10,000 cells per section, at least 4, at most the real 59."""
    return int(np.clip(round(n_cells / 10_000), 4, len(SECTION_NUMBERS)))


# ---------------------------------------------------------------------------------------------- files
class _HashingWriter:
    """Binary file that tracks its MD5 and size while bytes stream in."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: IO[bytes] = open(path, "wb")
        self._md5 = hashlib.md5()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._md5.update(data)
        self.size += len(data)

    def write_csv(self, frame: pd.DataFrame, header: bool) -> None:
        self.write(frame.to_csv(index=False, header=header, lineterminator="\n").encode())

    def close(self) -> tuple[int, str]:
        """Close; returns (size in bytes, MD5 hex digest)."""
        self._fh.close()
        return self.size, self._md5.hexdigest()


class _H5adAppender:
    """Writes an h5ad (CSR X, obs, var, uns) by appending chunks of cells; peak memory is one chunk."""

    def __init__(self, path: Path, var: pd.DataFrame, sections: list[str], uns: dict[str, str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = h5py.File(path, "w")
        self._sections = sections
        self.n_obs = 0
        self._file.attrs["encoding-type"] = "anndata"
        self._file.attrs["encoding-version"] = "0.1.0"
        write_elem(self._file, "var", var)
        write_elem(self._file, "uns", uns)
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(self._file, key, {})
        self._n_vars = len(var)

    def append(self, labels: np.ndarray, section_codes: np.ndarray, matrix: sp.csr_matrix) -> None:
        """Append cells: labels (n,) str, section codes (n,) int8 into ``sections``, CSR (n, n_vars) float64."""
        n = len(labels)
        if self.n_obs == 0:
            obs = pd.DataFrame(
                {"brain_section_label": pd.Categorical.from_codes(section_codes, categories=self._sections)},
                index=pd.Index(labels, name="cell_label"),
            )
            write_elem(self._file, "obs", obs, dataset_kwargs={"maxshape": (None,)})
            write_elem(self._file, "X", matrix)
        else:
            for key, values in (
                ("obs/cell_label", labels.astype(object)),
                ("obs/brain_section_label/codes", section_codes),
            ):
                dset = self._file[key]
                dset.resize((self.n_obs + n,))
                dset[self.n_obs :] = values
            sparse_dataset(self._file["X"]).append(matrix)
        self.n_obs += n

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class _Section:
    """One simulated section: real label number, position k, transforms and cell count."""

    number: int
    k: int
    n_cells: int
    angle: float  # in-plane rotation of section coordinates, radians
    shift: np.ndarray  # (2,) mm
    z_written: float  # z as written in cell_metadata.csv (sometimes over-precise)

    @property
    def label(self) -> str:
        return f"{FEATURE_MATRIX}.{self.number:02d}"

    @property
    def z(self) -> float:
        return section_z(self.number)

    def to_section_xy(self, xy: np.ndarray) -> np.ndarray:
        """Reconstructed (n, 2) mm -> section coordinates (n, 2) mm (rotation about the frame centre + shift)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        return (xy - _SECTION_CENTER) @ np.array([[c, s], [-s, c]]) + _SECTION_CENTER + self.shift


def _plan_sections(n_cells: int, n_sections: int, seed: int) -> list[_Section]:
    """A contiguous, centred run of the real sections, cells allocated by cross-section area."""
    start = (len(SECTION_NUMBERS) - n_sections) // 2
    ks = np.arange(start, start + n_sections)
    area = np.array([BrainGeometry.section_area(section_z(SECTION_NUMBERS[k])) for k in ks])
    share = n_cells * area / area.sum()
    counts = np.floor(share).astype(int)
    counts[np.argsort(-(share - counts), kind="stable")[: n_cells - counts.sum()]] += 1
    sections = []
    for k, n in zip(ks, counts):
        rng = np.random.default_rng([seed, 2, int(k)])
        z = section_z(SECTION_NUMBERS[k])
        over_precise = z > 0 and rng.random() < 0.3
        sections.append(
            _Section(
                number=SECTION_NUMBERS[k],
                k=int(k),
                n_cells=int(n),
                angle=float(rng.uniform(-0.35, 0.35)),
                shift=rng.uniform(-0.6, 0.6, 2),
                z_written=float(f"{z - 1e-7:.7f}") if over_precise else z,
            )
        )
    return sections


def _uuids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random version-4 UUID strings (n,) ``U36``, vectorised."""
    raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexdigits = np.frombuffer(b"0123456789abcdef", dtype="S1")
    chars = np.empty((n, 32), dtype="S1")
    chars[:, 0::2] = hexdigits[raw >> 4]
    chars[:, 1::2] = hexdigits[raw & 0x0F]
    dash = np.full((n, 1), b"-", dtype="S1")
    parts = [chars[:, :8], dash, chars[:, 8:12], dash, chars[:, 12:16], dash, chars[:, 16:20], dash, chars[:, 20:]]
    return np.ascontiguousarray(np.hstack(parts)).view("S36").ravel().astype("U36")


@dataclass
class _Chunk:
    """Cells gathered from consecutive blocks, ready to append to every output file."""

    labels: list[np.ndarray] = field(default_factory=list)
    codes: list[np.ndarray] = field(default_factory=list)
    blocks: list[CellBlock] = field(default_factory=list)
    metadata: list[pd.DataFrame] = field(default_factory=list)
    reconstructed: list[pd.DataFrame] = field(default_factory=list)
    ccf: list[pd.DataFrame] = field(default_factory=list)
    n_cells: int = 0

    def matrix(self, values: str, n_vars: int) -> sp.csr_matrix:
        """CSR (n_cells, n_vars) float64 of the blocks' ``counts`` or ``log2``; int64 indptr, int32 indices."""
        offsets = np.cumsum([0] + [len(b.counts) for b in self.blocks])
        m = sp.csr_matrix((self.n_cells, n_vars), dtype=np.float64)
        m.indptr = np.concatenate([[0]] + [b.indptr[1:] + off for b, off in zip(self.blocks, offsets)])
        m.indices = np.concatenate([b.indices for b in self.blocks])
        m.data = np.concatenate([getattr(b, values) for b in self.blocks])
        return m


def _simulate_block(
    model: BrainModel, section: _Section, block: int, n: int, seed: int, ccf_fraction_missing: float
) -> tuple[np.ndarray, CellBlock, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Cells ``block * BLOCK_CELLS ...`` of one section: labels, expression and the three CSV row sets.

    CSV rows are shuffled within the block (the real files are not in expression-file order).
    """
    rng = np.random.default_rng([seed, 1, section.k, block])
    cells = model.sample_block(rng, section.number, section.z, n)
    index = block * BLOCK_CELLS + np.arange(n, dtype=np.int64)
    experiment = 1_017_000_000 + 100_000 * section.number + seed % 100_000
    suffix = np.array(["", "", "", "", "-1", "-2", "-3", "-4"])[rng.integers(0, 8, n)]
    labels = np.char.add((experiment * 10**9 + 10**8 + index).astype("U19"), suffix)
    score = rng.beta(8.0, 3.0, n)
    in_metadata = score >= 0.5
    has_ccf = in_metadata & (rng.random(n) >= ccf_fraction_missing) & (section.number not in SECTIONS_WITHOUT_CCF)
    section_xy = section.to_section_xy(cells.xyz[:, :2])
    order = rng.permutation(n)
    in_metadata, has_ccf = in_metadata[order], has_ccf[order]
    alias = model.taxonomy.cluster_alias.to_numpy()[cells.cluster]
    pindex = model.parcellation.parcellation_index.to_numpy()[cells.leaf]
    metadata = pd.DataFrame(
        {
            "cell_label": labels[order],
            "brain_section_label": section.label,
            "cluster_alias": alias[order],
            "average_correlation_score": score[order],
            "feature_matrix_label": FEATURE_MATRIX,
            "donor_label": FEATURE_MATRIX,
            "donor_genotype": "wt/wt",
            "donor_sex": "M",
            "x": section_xy[order, 0],
            "y": section_xy[order, 1],
            "z": section.z_written,
            "abc_sample_id": _uuids(rng, n),
        }
    )[in_metadata]
    xyz = cells.xyz[order][has_ccf]
    rec = pd.DataFrame(
        {
            "cell_label": labels[order][has_ccf],
            "x": xyz[:, 0],
            "y": xyz[:, 1],
            "z": xyz[:, 2],
            "parcellation_index": pindex[order][has_ccf],
        }
    )
    ccf_xyz = xyz @ CCF_AFFINE.T + CCF_OFFSET
    ccf = rec.assign(x=ccf_xyz[:, 0], y=ccf_xyz[:, 1], z=ccf_xyz[:, 2])
    return labels, cells, metadata, rec, ccf


# ---------------------------------------------------------------------------------------------- manifest
def build_manifest(release: str, files: dict[str, tuple[int, str]]) -> dict:
    """Manifest dict (reference section 1.2) for ``files``: relative path -> (size in bytes, MD5 hex)."""
    directory_listing: dict = {}
    file_listing: dict = {}
    for directory, kind, version, name in RELEASE_FILES:
        rel = relative_path(directory, kind, version, name)
        size, md5 = files[rel]
        entry = {"version": version, "relative_path": rel, "url": BUCKET_URL + rel, "size": size, "file_hash": md5}
        base = name.rsplit("/", 1)[-1]
        kinds = file_listing.setdefault(directory, {}).setdefault(kind, {})
        if base.endswith(".h5ad"):
            tag, variant = base.removesuffix(".h5ad").rsplit("-", 1)
            kinds.setdefault(tag, {})[variant] = {"files": {"h5ad": entry}}
        else:
            tag, ext = base.rsplit(".", 1)
            kinds[tag] = {"files": {ext: entry}}
        dir_rel = relative_path(directory, kind, version, "").rstrip("/")
        listing = directory_listing.setdefault(directory, {"directories": {}})["directories"].setdefault(
            kind,
            {
                "version": version,
                "relative_path": dir_rel,
                "url": f"{BUCKET_URL}{dir_rel}/",
                "view_link": f"{BUCKET_URL}index.html#{dir_rel}/",
                "total_size": 0,
            },
        )
        listing["total_size"] += size
    return {
        "version": release,
        "resource_uri": RESOURCE_URI,
        "directory_listing": directory_listing,
        "file_listing": file_listing,
    }


# ---------------------------------------------------------------------------------------------- tree
def _write_static_tables(model: BrainModel, root: Path, files: dict[str, tuple[int, str]]) -> None:
    """gene.csv and the taxonomy / parcellation views (small, written whole)."""
    tables = {
        "gene.csv": model.genes,
        "views/cluster_to_cluster_annotation_membership_pivoted.csv": model.taxonomy[
            ["cluster_alias", *TAXONOMY_LEVELS]
        ],
        "views/cluster_to_cluster_annotation_membership_color.csv": model.taxonomy[
            ["cluster_alias", *(f"{lvl}_color" for lvl in TAXONOMY_LEVELS)]
        ],
        "views/parcellation_to_parcellation_term_membership_acronym.csv": model.parcellation[
            ["parcellation_index", *PARCELLATION_LEVELS]
        ],
        "views/parcellation_to_parcellation_term_membership_color.csv": model.parcellation[
            ["parcellation_index", *(f"{lvl}_color" for lvl in PARCELLATION_LEVELS)]
        ],
    }
    for directory, kind, version, name in RELEASE_FILES:
        if name in tables:
            rel = relative_path(directory, kind, version, name)
            writer = _HashingWriter(root / rel)
            writer.write_csv(tables[name], header=True)
            files[rel] = writer.close()


def write_synthetic_release(
    out: Path,
    n_cells: int,
    seed: int = 0,
    release: str = "20250531",
    chunk_cells: int = 200_000,
    n_sections: int | None = None,
    progress: bool = True,
    n_clusters: int | None = None,
) -> Path:
    """Write a synthetic ABC release tree under ``out``; returns the path of its ``manifest.json``.

    Parameters
    ----------
    out: release root; files land at ``out/<relative_path>``. It must be absent, empty or an earlier release
        tree, which is replaced only once the new tree is complete (built in a sibling temporary folder).
    n_cells: cells in the expression files (about 94 % of them pass QC into ``cell_metadata.csv``).
    seed: seed of everything (brain model and cells); the same arguments give byte-identical files.
    release: manifest version (``YYYYMMDD``), written to ``releases/<release>/manifest.json``.
    chunk_cells: cells gathered per write (rounded up to whole blocks of 8,192); sets peak memory.
    n_sections: sections (a centred run of the 59 real ones, 0.2 mm apart); default :func:`default_n_sections`.
    progress: show a tqdm progress bar.
    n_clusters: clusters of the real taxonomy to simulate (a seed-chosen subset; all 5,322 when larger); default
        :func:`~abc_pipeline.atlas.synthetic_model.default_n_clusters`.
    """
    out = Path(out)
    if n_cells < 1:
        raise InputError(f"synthetic release: n_cells must be >= 1 (got {n_cells}); pass --cells N")
    if not (len(release) == 8 and release.isdigit()):
        raise InputError(f"synthetic release: release {release!r} is not a YYYYMMDD date; pass e.g. --release 20250531")
    n_sections = default_n_sections(n_cells) if n_sections is None else n_sections
    if not 1 <= n_sections <= len(SECTION_NUMBERS):
        raise InputError(f"synthetic release: n_sections must be in 1..{len(SECTION_NUMBERS)} (got {n_sections})")
    log.info("synthetic release %s: %d cells in %d sections, seed %d -> %s", release, n_cells, n_sections, seed, out)
    with staged_output(out, "synthetic-release") as tmp:
        n_clusters = default_n_clusters(n_cells) if n_clusters is None else max(n_clusters, 1)
        manifest_path = _write_tree(tmp, n_cells, seed, release, max(chunk_cells, 1), n_sections, n_clusters, progress)
    log.info("synthetic release written: %s", out / manifest_path)
    return out / manifest_path


def _write_tree(
    root: Path,
    n_cells: int,
    seed: int,
    release: str,
    chunk_cells: int,
    n_sections: int,
    n_clusters: int,
    progress: bool,
) -> Path:
    sections = _plan_sections(n_cells, n_sections, seed)
    model = BrainModel(seed, [s.z for s in sections], n_clusters)
    files: dict[str, tuple[int, str]] = {}
    _write_static_tables(model, root, files)
    rel = {name: relative_path(d, k, v, name) for d, k, v, name in RELEASE_FILES}
    csv = {
        name: _HashingWriter(root / rel[name])
        for name in ("cell_metadata.csv", "reconstructed_coordinates.csv", "ccf_coordinates.csv")
    }
    var = model.genes.set_index("gene_identifier")[["gene_symbol", "transcript_identifier"]]
    uns = {
        "accessed_on": f"{release[:4]}-{release[4:6]}-{release[6:]}",
        "src": f"synthetic ABC release (abc_pipeline.atlas.synthetic, seed {seed})",
    }
    section_labels = [s.label for s in sections]
    h5 = {
        variant: _H5adAppender(root / rel[f"C57BL6J-638850-{variant}.h5ad"], var, section_labels, uns)
        for variant in ("raw", "log2")
    }
    header = True

    def flush(chunk: _Chunk) -> None:
        nonlocal header
        labels, codes = np.concatenate(chunk.labels), np.concatenate(chunk.codes)
        for variant, values in (("raw", "counts"), ("log2", "log2")):
            h5[variant].append(labels, codes, chunk.matrix(values, len(var)))
        for name, frames in (
            ("cell_metadata.csv", chunk.metadata),
            ("reconstructed_coordinates.csv", chunk.reconstructed),
            ("ccf_coordinates.csv", chunk.ccf),
        ):
            csv[name].write_csv(pd.concat(frames, ignore_index=True), header=header)
        header = False

    try:
        chunk = _Chunk()
        with tqdm(total=n_cells, unit="cell", unit_scale=True, desc="synth", disable=not progress) as bar:
            for code, section in enumerate(sections):
                for block, start in enumerate(range(0, section.n_cells, BLOCK_CELLS)):
                    n = min(BLOCK_CELLS, section.n_cells - start)
                    labels, cells, meta, rec, ccf = _simulate_block(model, section, block, n, seed, 0.03)
                    chunk.labels.append(labels)
                    chunk.codes.append(np.full(n, code, dtype=np.int8))
                    chunk.blocks.append(cells)
                    chunk.metadata.append(meta)
                    chunk.reconstructed.append(rec)
                    chunk.ccf.append(ccf)
                    chunk.n_cells += n
                    bar.update(n)
                    if chunk.n_cells >= chunk_cells:
                        flush(chunk)
                        chunk = _Chunk()
            if chunk.n_cells:
                flush(chunk)
    finally:
        for writer in h5.values():
            writer.close()
        for name, writer in csv.items():
            files[rel[name]] = writer.close()
    for writer in h5.values():
        files[str(writer.path.relative_to(root))] = (writer.path.stat().st_size, file_md5(writer.path))
    manifest_rel = f"releases/{release}/manifest.json"
    (root / manifest_rel).parent.mkdir(parents=True, exist_ok=True)
    (root / manifest_rel).write_text(json.dumps(build_manifest(release, files), indent=2) + "\n")
    return Path(manifest_rel)
