"""What the label step makes of one image, as data: its label maps (`LabelMap`, `ImageLabels`) and
how a labelling at a pixel stride samples the image (`subsample`). No torch: the score step and the
evaluators read these in CPU tasks that start fast."""

import io
import json
from dataclasses import dataclass, field

import numpy as np

from core.panoptic import Panoptic


def first_sample(length: int, stride: int) -> int:
    return min(stride // 2, length - 1)  # a stride beyond the image still keeps one pixel


def subsample(array: np.ndarray, stride: int) -> np.ndarray:
    """The pixels of an (H, W, ...) map that `PixelAssigner` labels at this stride."""
    if stride == 1:
        return array
    return array[first_sample(array.shape[0], stride) :: stride, first_sample(array.shape[1], stride) :: stride]


@dataclass(frozen=True)
class LabelMap:
    """One labelling of one image, to be scored: trainIds (255 = none), at every pixel or, with
    `stride` s, at every s-th pixel in each direction (`core.labelling.assign.subsample` of the image)."""

    train_ids: np.ndarray  # (H, W) uint8, or its stride subsample
    instances: np.ndarray | None = None  # (H, W) int instance ids of thing pixels, where a variant makes them
    stride: int = 1


@dataclass
class ImageLabels:
    clusters: dict[str, np.ndarray]  # per fit: the protocol's labelling, (H, W) or its stride subsample
    targets: dict[str, LabelMap]  # the named label maps to score (module docstring); one object per distinct map
    seconds: dict[str, float]  # per variant: the main fit's assignment plus the variant's own work
    crops: dict[str, np.ndarray] = field(default_factory=dict)  # CAUSE's crop: "crop", "crop+crf" (crop, crop)
    segments: dict[str, Panoptic] = field(default_factory=dict)  # targets already segmented (for the PNGs), by name

    def variant(self, name: str) -> LabelMap:
        return self.targets[f"variant/{name}"]

    def to_bytes(self) -> bytes:
        """One image's labels as an npz, to travel from the label step to the score step (no pickle):
        a map shared by several targets is stored once and shared again when read (`from_bytes`)."""
        arrays, first = {}, {}
        meta = {"targets": {}, "seconds": self.seconds, "crops": list(self.crops), "segments": list(self.segments)}
        for name, labels in self.targets.items():
            key = first.setdefault(id(labels), name)
            meta["targets"][name] = {"same_as": key, "stride": labels.stride, "instances": labels.instances is not None}
            if key == name:
                arrays[f"target/{name}"] = labels.train_ids
                if labels.instances is not None:
                    arrays[f"instances/{name}"] = labels.instances
        arrays |= {f"clusters/{n}": m for n, m in self.clusters.items()} | {
            f"crops/{n}": m for n, m in self.crops.items()
        }
        for name, pan in self.segments.items():
            arrays |= {
                f"segments/{name}/{f}": getattr(pan, f) for f in ("ids", "segment_ids", "category", "iscrowd", "area")
            }
        buffer = io.BytesIO()
        np.savez(buffer, _meta=np.array(json.dumps(meta)), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageLabels":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop("_meta")))
        targets = {}
        for name, t in meta["targets"].items():
            targets[name] = (
                targets[t["same_as"]]
                if t["same_as"] != name
                else LabelMap(arrays[f"target/{name}"], arrays.get(f"instances/{name}"), t["stride"])
            )
        clusters = {k.removeprefix("clusters/"): v for k, v in arrays.items() if k.startswith("clusters/")}
        segments = {
            name: Panoptic(
                *(arrays[f"segments/{name}/{f}"] for f in ("ids", "segment_ids", "category", "iscrowd", "area"))
            )
            for name in meta["segments"]
        }
        return cls(clusters, targets, meta["seconds"], {n: arrays[f"crops/{n}"] for n in meta["crops"]}, segments)
