"""Centres and a cluster -> class mapping made by another tool, read from an .npz and checked before
they become a fit of a run (`submit.py import-fit`, `storage.run.fits.import_fit`).

The file the paper writes: `mbps_pytorch/generate_overclustered_semantics.py` (GitHub
qbit-glitch/unsupervised_panoptic_segmentation, commit 2214ac5), `fit_kmeans` then
`np.savez(centroids_path, centroids=centroids_norm, cluster_to_class=cluster_to_class)` into
`<cityscapes_root>/<output_subdir>/kmeans_centroids.npz`, and `np.load(...)["centroids"]`,
`["cluster_to_class"]` when it reuses them (`--load_centroids`):
  - `centroids`: (k, 90) float64, MiniBatchKMeans' `cluster_centers_` (fitted on float64 features)
    divided by `norm + 1e-8`: unit rows to within 1e-8;
  - `cluster_to_class`: (k,) uint8, `np.argmax` of the (k, 19) cluster x class patch counts, so
    trainIds 0-18 (a cluster without a labelled patch gets 0; never 255).
It labels a pixel by cosine to those unit rows (`predict_with_kmeans`: the best cluster's cosine per
class, then the best class), which is the nearest unit centre: what this tool does with every fit.

Centres that are not unit rows (e.g. raw `cluster_centers_`, which sklearn's `predict` assigns by
Euclidean distance) are divided by their norms here and then labelled by cosine like every fit, which
can assign a pixel to another centre than Euclidean distance to the raw centres would; the fit
records the rows' norms and that they were rescaled, and the report says so.
"""

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.classes import IGNORE, NUM_CLASSES
from core.errors import UserError

PAPER_KEYS = ("centroids", "cluster_to_class")  # generate_overclustered_semantics.py's np.savez keys
MAX_VALUES = 1 << 26  # a centre file is k x D numbers (300 x 768 is 230k): a larger array declared is refused unread
MAX_BYTES = 8 * MAX_VALUES + (1 << 20)  # the file is read whole (hashed and parsed from the same bytes)
UNIT_TOLERANCE = 1e-3  # the norm a row may differ from 1 and still count as unit (core.clustering.fit_artifact's check)


class CentreFileError(UserError, ValueError):
    """A centre file that cannot be imported; the message names the file and the fix."""


@dataclass(frozen=True)
class ImportedCentres:
    centroids: np.ndarray  # (k, D) float32 unit rows
    mapping: np.ndarray  # (k,) int64 trainIds, 255 = no class
    record: dict  # where they came from and what was done to them (the fit's meta "imported_from")


def _member_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """An .npy member's shape and dtype, from its header alone (nothing is allocated yet)."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _read_arrays(path: Path, data: bytes, keys: tuple[str, str]) -> dict[str, np.ndarray]:
    """The two named arrays of an .npz (its bytes `data`), refused without reading them where they
    are object arrays (pickles, which can run code) or far larger than any centre file."""
    flags = {keys[0]: "--centroids-key", keys[1]: "--mapping-key"}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {name[: -len(".npy")]: name for name in archive.namelist() if name.endswith(".npy")}
            for key in keys:
                if key not in members:
                    raise CentreFileError(
                        f"{path} has no array {key!r} (it has: "
                        f"{', '.join(sorted(members)) or 'none'}): name the right one with "
                        f"{flags[key]}"
                    )
                shape, dtype = _member_header(archive, members[key])
                if dtype.hasobject:
                    raise CentreFileError(
                        f"{path}: {key!r} is an array of Python objects, which only pickle can load, "
                        "and a pickle can run code: it is refused. Save plain numbers: "
                        "np.savez(path, centroids=np.asarray(c, np.float32), "
                        "cluster_to_class=np.asarray(m, np.uint8))"
                    )
                if int(np.prod(shape, dtype=np.float64)) > MAX_VALUES:
                    raise CentreFileError(
                        f"{path}: {key!r} declares shape {shape}, more than {MAX_VALUES} values: "
                        "that is not a file of cluster centres"
                    )
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except zipfile.BadZipFile:
        what = "holds one array (.npy), not an .npz" if data.startswith(b"\x93NUMPY") else "is not an .npz archive"
        raise CentreFileError(
            f"{path} {what}: save the centres and their mapping together, "
            f"np.savez('centres.npz', {keys[0]}=..., {keys[1]}=...)"
        ) from None
    except CentreFileError:
        raise
    except (ValueError, OSError, EOFError) as err:  # a damaged member
        raise CentreFileError(f"{path} cannot be read as an .npz ({err}): save it again with np.savez") from None


def read_centre_file(path: Path, feature_dim: int, keys: tuple[str, str] = PAPER_KEYS) -> ImportedCentres:
    """Centres (k, D) and mapping (k,) from an .npz, checked: D is this run's feature dimension,
    every value finite, no zero row, one trainId 0-18 (or 255, no class) per centre, some cluster
    mapped to a class. Rows that are not unit length are L2-normalised (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CentreFileError(
            f"{path} is not a file: name the .npz the other tool saved (the paper's is kmeans_centroids.npz)"
        )
    if path.stat().st_size > MAX_BYTES:
        raise CentreFileError(
            f"{path} is {path.stat().st_size} bytes, more than a file of cluster centres "
            f"({MAX_BYTES}): name the .npz of centres and their mapping"
        )
    data = path.read_bytes()
    arrays = _read_arrays(path, data, keys)
    centres, mapping = arrays[keys[0]], arrays[keys[1]]
    if centres.ndim != 2 or 0 in centres.shape or not np.issubdtype(centres.dtype, np.floating):
        raise CentreFileError(
            f"{path}: {keys[0]!r} must be a 2-D float array of centres (k, D), got {centres.dtype} "
            f"of shape {centres.shape}"
        )
    k, dim = centres.shape
    if dim != feature_dim:
        raise CentreFileError(
            f"{path}: the centres are {dim}-d and this run's features {feature_dim}-d: import "
            "centres fitted on features of this run's model (model.feature_kind, model.vit)"
        )
    if bad := np.flatnonzero(~np.isfinite(centres).all(axis=1)).tolist():
        raise CentreFileError(
            f"{path}: {keys[0]!r} has NaN or inf in {len(bad)} of its {k} centres (first: centre "
            f"{bad[0]}): a fit needs finite centres"
        )
    norms = np.linalg.norm(centres.astype(np.float64), axis=1)
    if not np.isfinite(norms).all():
        raise CentreFileError(
            f"{path}: {keys[0]!r} has centres too long to measure (their norm overflows float64): "
            "a fit needs centres of finite length"
        )
    if zero := np.flatnonzero(norms == 0).tolist():
        raise CentreFileError(
            f"{path}: {len(zero)} centres are all zeros (first: centre {zero[0]}): a zero row has no "
            "direction to label by cosine"
        )
    if mapping.shape != (k,) or not np.issubdtype(mapping.dtype, np.integer):
        raise CentreFileError(
            f"{path}: {keys[1]!r} must be {k} integer trainIds (one per centre), got {mapping.dtype} "
            f"of shape {mapping.shape}"
        )
    mapping = mapping.astype(np.int64)
    outside = np.flatnonzero(((mapping < 0) | (mapping >= NUM_CLASSES)) & (mapping != IGNORE))
    if len(outside):
        raise CentreFileError(
            f"{path}: {keys[1]!r} maps {len(outside)} clusters outside the trainIds "
            f"0-{NUM_CLASSES - 1} and {IGNORE} (no class), e.g. cluster {outside[0]} -> "
            f"{arrays[keys[1]][outside[0]]}: map each cluster to a Cityscapes trainId"
        )
    if (mapping == IGNORE).all():
        raise CentreFileError(
            f"{path}: {keys[1]!r} maps every cluster to {IGNORE} (no class): its labels would all be void"
        )
    rescaled = bool(np.abs(norms - 1).max() > UNIT_TOLERANCE)
    record = {
        "file": str(path.resolve()),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "keys": {"centroids": keys[0], "mapping": keys[1]},
        "dtypes": {"centroids": str(centres.dtype), "mapping": str(arrays[keys[1]].dtype)},
        "row_norms": [float(norms.min()), float(norms.max())],
        "rescaled_to_unit": rescaled,
    }
    unit = (centres.astype(np.float64) / norms[:, None]).astype(np.float32)
    return ImportedCentres(unit, mapping, record)
