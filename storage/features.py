"""Patch features as Parquet: the schema extract writes (and apply with apply.write_features), where each
shard's files go, and reading them back as per-image grids.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa

# Bumped when the patch rows, their markers or their plan change (2: image height and width, other scales in
# _scales/): a features folder of another format is then refused by the plan check rather than misread.
PATCH_FORMAT = 4  # 3: markers list their files with sizes and checksums; 4: the dataset fingerprint is root-relative


def patch_schema(feature_dim: int, feature_dtype: str = "float16") -> pa.Schema:
    """One row per patch. float16 halves the bytes; k-means runs on float32 copies."""
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("row", pa.int16()),
            ("col", pa.int16()),
            ("feature", pa.list_(pa.float16() if feature_dtype == "float16" else pa.float32(), feature_dim)),
            ("label", pa.uint8()),  # patch majority trainId, 255 = ignore / unlabelled
            ("height", pa.uint16()),  # the image's size, which places the grid on its pixels (constant per image)
            ("width", pa.uint16()),
        ]
    )


def patch_table(
    image_ids: list[str],
    features: list[np.ndarray],
    labels: list[np.ndarray],
    schema: pa.Schema,
    image_sizes: list[tuple[int, int]],
) -> pa.Table:
    """Per image (D, h, w) features, (h, w) labels and its (H, W) -> one Arrow table of patch rows, row-major."""
    value_type = schema.field("feature").type.value_type.to_pandas_dtype()
    feature_dim = schema.field("feature").type.list_size
    ids, rows, cols, flat, labs, heights, widths = [], [], [], [], [], [], []
    for image_id, feat, lab, (height, width) in zip(image_ids, features, labels, image_sizes):
        d, h, w = feat.shape
        rr, cc = np.meshgrid(np.arange(h, dtype=np.int16), np.arange(w, dtype=np.int16), indexing="ij")
        ids.extend([image_id] * (h * w))
        rows.append(rr.ravel())
        cols.append(cc.ravel())
        flat.append(feat.reshape(d, h * w).T.astype(value_type).ravel())
        labs.append(lab.ravel().astype(np.uint8))
        heights.append(np.full(h * w, height, np.uint16))
        widths.append(np.full(h * w, width, np.uint16))
    if not ids:
        return schema.empty_table()
    values = pa.array(np.concatenate(flat))
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "row": pa.array(np.concatenate(rows)),
            "col": pa.array(np.concatenate(cols)),
            "feature": pa.FixedSizeListArray.from_arrays(values, feature_dim),
            "label": pa.array(np.concatenate(labs)),
            "height": pa.array(np.concatenate(heights)),
            "width": pa.array(np.concatenate(widths)),
        },
        schema=schema,
    )


def image_grids(table: pa.Table) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """A features table -> per image (features (D, gh, gw) float32, image (H, W)); rows of an image
    are consecutive and row-major, as `patch_table` writes them."""
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    if not len(ids):
        return {}
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    feats = features_from_table(table)
    rows, cols = table.column("row").to_numpy(), table.column("col").to_numpy()
    heights, widths = table.column("height").to_numpy(), table.column("width").to_numpy()
    grids = {}
    for a, b in zip(starts, ends):
        gh, gw = int(rows[b - 1]) + 1, int(cols[b - 1]) + 1
        grids[str(ids[a])] = (
            np.ascontiguousarray(feats[a:b].reshape(gh, gw, -1).transpose(2, 0, 1)),
            (int(heights[a]), int(widths[a])),
        )
    return grids


def feature_path(features_dir: Path, shard: str, scale: float = 1.0) -> Path:
    """A shard's patch rows at one inference scale: scale 1 (the one the fit uses) at the top level,
    others in `_scales/<s>/`, which dataset readers skip (a leading '_'), so `features/` read as one
    Parquet dataset holds scale 1 only."""
    folder = Path(features_dir) if scale == 1.0 else Path(features_dir) / "_scales" / f"{scale:g}"
    return folder / f"{shard}.parquet"


def window_path(features_dir: Path, shard: str) -> Path:
    """A shard's window features (the paper protocol's: each image's base-scale windows side by side,
    then the paper baseline's own windows where they differ from them)."""
    return Path(features_dir) / "_windows" / f"{shard}.parquet"


def backbone_path(features_dir: Path, shard: str) -> Path:
    """A shard's raw backbone patch features beside the head's (model.compare_backbone), base scale."""
    return Path(features_dir) / "_backbone" / f"{shard}.parquet"


def cause_path(features_dir: Path, shard: str) -> Path:
    """A shard's features of CAUSE's one 322 centre-crop window per image (the cause protocol's):
    its unflipped pass and its flip-averaged pass side by side, (D, g, 2g) per image."""
    return Path(features_dir) / "_cause" / f"{shard}.parquet"


def features_from_table(table: pa.Table) -> np.ndarray:
    """The `feature` column as an (n, D) float32 array, without a per-row Python loop."""
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
