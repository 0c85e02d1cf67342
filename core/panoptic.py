"""Panoptic segments: a label map's stuff regions and thing instances, and the ground truth's.

A segmentation is a `Panoptic`: an (H, W) map of segment ids (0 = void, no segment) and a table
of its segments. Segment ids follow the Cityscapes convention, so the same ids serve the
instanceIds PNG, the panoptic PNG and the COCO JSON:
  - stuff class: id = labelId (one segment per class, all its pixels);
  - thing instance: id = labelId * 1000 + n, n = 0, 1, ... per class;
  - ground-truth crowd region of a thing class (instanceId < 1000): id = labelId, iscrowd.
The labelling writes these segments; the evaluators score them (`core.evaluation.pq`).
"""

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from core.classes import (
    IGNORE,
    NUM_CLASSES,
    THING_TRAIN_IDS,
    TRAIN_ID_TO_LABEL_ID,
)
from core.image_ops import connected_components, histogram, lookup

VOID = 0  # segment id of pixels that belong to no segment
MAX_INSTANCES_PER_CLASS = 1000  # ids labelId*1000 + n need n < 1000
LOOKUP_LIMIT = 1 << 20  # segment ids below this are indexed through a table (4-8 MB at most)

_IS_THING = np.zeros(256, dtype=bool)
_IS_THING[THING_TRAIN_IDS] = True

# trainId (uint8) -> itself for the 19 classes, IGNORE for anything else
_SEMANTIC_OF = np.full(256, IGNORE, dtype=np.uint8)
_SEMANTIC_OF[:NUM_CLASSES] = np.arange(NUM_CLASSES)


def _semantic_of_any(train_ids: np.ndarray) -> np.ndarray:
    """`_SEMANTIC_OF` for a map of any integer type: (H, W) uint8, every value outside 0..18 -> IGNORE."""
    t = train_ids.astype(np.int64)
    return np.where((t >= 0) & (t < NUM_CLASSES), t, IGNORE).astype(np.uint8)


# labelId (0..999) -> trainId; every labelId outside the 19 evaluation classes is void.
_LABEL_TO_TRAIN_1000 = np.full(MAX_INSTANCES_PER_CLASS, IGNORE, dtype=np.int64)
_LABEL_TO_TRAIN_1000[TRAIN_ID_TO_LABEL_ID] = np.arange(NUM_CLASSES)


@dataclass(frozen=True)
class Panoptic:
    """One image's panoptic segmentation.

    ids: (H, W) int32 segment id per pixel, 0 = void.
    segment_ids: (n,) int64, ascending, every id > 0 present in `ids` exactly once.
    category: (n,) int64 trainId of each segment.
    iscrowd: (n,) bool (ground-truth crowd regions; always False for predictions).
    area: (n,) int64 pixel count of each segment.
    """

    ids: np.ndarray
    segment_ids: np.ndarray
    category: np.ndarray
    iscrowd: np.ndarray
    area: np.ndarray

    @property
    def label_id(self) -> np.ndarray:
        """(n,) int64 Cityscapes labelId of each segment (the COCO `category_id`)."""
        return TRAIN_ID_TO_LABEL_ID[self.category].astype(np.int64)

    def bboxes(self) -> np.ndarray:
        """(n, 4) int64 COCO boxes [x, y, width, height] of each segment."""
        n = len(self.segment_ids)
        boxes = np.zeros((n, 4), dtype=np.int64)
        if n == 0:
            return boxes
        idx = _compact(self.ids, self.segment_ids)  # n = void
        labels = np.where(idx < n, idx + 1, 0)
        for i, sl in enumerate(ndimage.find_objects(labels, max_label=n)):
            if sl is not None:
                boxes[i] = (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
        return boxes


def _compact(ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """(H, W) int64 index of each pixel's segment in `segment_ids`; void and unknown ids -> n."""
    n = len(segment_ids)
    if n == 0:
        return np.zeros(ids.shape, dtype=np.int64)
    top = max(int(segment_ids[-1]), int(ids.max()))
    if top < LOOKUP_LIMIT:  # Cityscapes ids (labelId * 1000 + n < 34000): one gather through a table
        table = np.full(top + 1, n, np.int64)
        table[segment_ids[segment_ids >= 0]] = np.flatnonzero(segment_ids >= 0)
        return table[np.maximum(ids, 0)] if ids.min() < 0 else table[ids]
    pos = np.minimum(np.searchsorted(segment_ids, ids), n - 1)
    return np.where(segment_ids[pos] == ids, pos, n).astype(np.int64)


def segment_index(panoptic: Panoptic) -> np.ndarray:
    """(H, W) int64 index of each pixel's segment in `panoptic.segment_ids` (n = void): what
    `pq_stats` derives from each side; a ground truth scored many times can pass its own once."""
    return _compact(panoptic.ids, panoptic.segment_ids)


def _from_id_map(ids: np.ndarray, category_of_id) -> Panoptic:
    """Panoptic from an id map; `category_of_id(segment_ids) -> (trainIds, iscrowd)`."""
    segment_ids, area = np.unique(ids, return_counts=True)
    keep = segment_ids != VOID
    segment_ids, area = segment_ids[keep].astype(np.int64), area[keep].astype(np.int64)
    category, iscrowd = category_of_id(segment_ids)
    return Panoptic(ids.astype(np.int32), segment_ids, category.astype(np.int64), iscrowd.astype(bool), area)


def _semantic_label(segment_ids: np.ndarray) -> np.ndarray:
    """labelId of Cityscapes-style ids (labelId, or labelId*1000 + n)."""
    return np.where(segment_ids < 1000, segment_ids, segment_ids // 1000)


def gt_panoptic(instance_ids: np.ndarray, label_ids: np.ndarray | None = None) -> Panoptic:
    """Ground truth from a Cityscapes `*_gtFine_instanceIds.png` array, as `createPanopticImgs` does.

    The segment id is the instanceId itself: labelId for stuff and for crowd regions of thing
    classes (instanceId < 1000, iscrowd), labelId*1000 + n for thing instances. Pixels of
    labelIds outside the 19 evaluation classes are void. `label_ids` (the `*_labelIds.png`
    array), when given, must agree with the instance map's classes.
    """
    if instance_ids.ndim != 2:
        raise ValueError(f"instanceIds must be 2-D (H, W), got shape {instance_ids.shape}")
    inst = instance_ids.astype(np.int64)
    if inst.size and (inst.min() < 0 or inst.max() >= 1000 * MAX_INSTANCES_PER_CLASS):
        raise ValueError(f"instanceIds out of range [{inst.min()}, {inst.max()}]")
    semantic = _semantic_label(inst)
    if label_ids is not None:
        if label_ids.shape != instance_ids.shape:
            raise ValueError(f"labelIds shape {label_ids.shape} and instanceIds shape {instance_ids.shape} differ")
        if not np.array_equal(semantic, label_ids.astype(np.int64)):
            raise ValueError(
                "labelIds and instanceIds disagree (instanceId < 1000 or instanceId // 1000 must be the labelId)"
            )
    train = _LABEL_TO_TRAIN_1000[semantic]
    ids = np.where(train == IGNORE, VOID, inst)

    def categories(segment_ids):
        cat = _LABEL_TO_TRAIN_1000[_semantic_label(segment_ids)]
        return cat, (segment_ids < 1000) & _IS_THING[cat]

    return _from_id_map(ids, categories)


def panoptic_from_train_ids(
    train_ids: np.ndarray,
    instances: np.ndarray | None = None,
    min_area: int = 1,
    stuff_min_area: int = 1,
    connectivity: int = 8,
) -> Panoptic:
    """Predicted panoptic segmentation from an (H, W) trainId map (255 = ignore).

    Stuff classes (trainId 0..10): one segment per class holding all its pixels (its connected
    regions merged, as Cityscapes panoptic ground truth does), dropped to void when the class
    covers fewer than `stuff_min_area` pixels.
    Thing classes (11..18): instances are the connected components of each class
    (`connectivity` 4 or 8), or, when `instances` is given, the distinct (instance, class)
    pairs of an external (H, W) integer instance map (0 = no instance: such thing pixels are
    void). Instances smaller than `min_area` pixels are void. Instance ids are
    labelId*1000 + n with n numbered in raster order of each instance's first pixel (component
    labelling) or in ascending instance id (external map); at most 1000 per class: if there are
    more, the 1000 largest are kept and the rest become void.
    """
    if train_ids.ndim != 2:
        raise ValueError(f"trainIds must be 2-D (H, W), got shape {train_ids.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if instances is not None and instances.shape != train_ids.shape:
        raise ValueError(f"instance map shape {instances.shape} and trainIds shape {train_ids.shape} differ")
    sem = (
        lookup(train_ids, _SEMANTIC_OF) if train_ids.dtype == np.uint8 else _semantic_of_any(train_ids)
    )  # (H, W) uint8

    # Stuff: one segment per class.
    class_area = histogram(sem)[:NUM_CLASSES]
    stuff_label = np.zeros(256, dtype=np.int32)
    for t in range(NUM_CLASSES):
        if not _IS_THING[t] and class_area[t] >= max(stuff_min_area, 1):
            stuff_label[t] = TRAIN_ID_TO_LABEL_ID[t]
    ids = lookup(sem, stuff_label)
    stuff = [t for t in range(NUM_CLASSES) if stuff_label[t]]
    segment_ids = [TRAIN_ID_TO_LABEL_ID[stuff].astype(np.int64)]
    category, area = [np.array(stuff, np.int64)], [class_area[stuff]]
    if any(class_area[t] for t in THING_TRAIN_IDS):
        if instances is None:
            ids, things = _component_instances(sem, ids, class_area, min_area, connectivity)
        else:
            ids, things = _external_instances(sem, ids, instances, min_area)
        for found, parts in zip(things, (segment_ids, category, area)):
            parts.append(found)
    segment_ids = np.concatenate(segment_ids)
    return Panoptic(
        ids.astype(np.int32, copy=False),
        segment_ids,
        np.concatenate(category),
        np.zeros(len(segment_ids), bool),
        np.concatenate(area).astype(np.int64),
    )


def _largest_kept(members: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """At most MAX_INSTANCES_PER_CLASS of `members` (ascending indices into `sizes`): the largest, ties
    to the first, still ascending."""
    if members.size <= MAX_INSTANCES_PER_CLASS:
        return members
    return np.sort(members[np.argsort(-sizes[members], kind="stable")[:MAX_INSTANCES_PER_CLASS]])


def _component_instances(sem, ids, class_area, min_area, connectivity):
    """Thing instances as the connected components of each class, written into `ids` (0 on thing
    pixels) -> (ids, (segment_ids, category, area))."""
    segment_ids, category, area = [], [], []
    for t in [t for t in THING_TRAIN_IDS if class_area[t]]:
        # the class's components within its bounding box: raster order there is raster order here
        class_mask = cv2.compare(sem, t, cv2.CMP_EQ)  # (H, W) uint8, 255 on class t
        x, y, w, h = cv2.boundingRect(class_mask)  # the box of its nonzero pixels
        box = (slice(y, y + h), slice(x, x + w))
        labels, n = connected_components(class_mask[box], connectivity)
        comp_area = np.bincount(labels.ravel(), minlength=n + 1)
        members = _largest_kept(np.flatnonzero(comp_area[1:] >= max(min_area, 1)) + 1, comp_area)
        seg_id = np.zeros(n + 1, np.int32)  # component -> segment id, 0 = void
        seg_id[members] = int(TRAIN_ID_TO_LABEL_ID[t]) * 1000 + np.arange(members.size, dtype=np.int32)
        ids[box] += seg_id[labels]  # thing pixels are 0 in ids, and labels are 0 off the class
        segment_ids.append(seg_id[members].astype(np.int64))
        category.append(np.full(members.size, t, np.int64))
        area.append(comp_area[members])
    return ids, tuple(np.concatenate(x) for x in (segment_ids, category, area))


def _external_instances(sem, ids, instances, min_area):
    """Thing instances as the distinct (instance, class) pairs of an external instance map
    -> (ids, (segment_ids, category, area))."""
    inst = instances.astype(np.int64)
    if inst.min() < 0:
        raise ValueError("instance ids must be >= 0 (0 = no instance)")
    if inst.size and inst.max() >= 1 << 40:  # (class + 1) x (max + 1) would overflow int64: ranks keep the order
        inst = np.unique(inst, return_inverse=True)[1].reshape(inst.shape) + (inst.min() > 0)
    thing_mask = _IS_THING[sem]
    raw = np.where(thing_mask & (inst > 0), (sem.astype(np.int64) + 1) * (int(inst.max()) + 1) + inst, 0)
    keys, first_pixel, key, key_area = np.unique(raw, return_index=True, return_inverse=True, return_counts=True)
    key = key.reshape(raw.shape) if keys[0] == 0 else key.reshape(raw.shape) + 1  # key 0 = no instance
    if keys[0] != 0:
        key_area, first_pixel = np.r_[0, key_area], np.r_[0, first_pixel]
    seg_class = sem.ravel()[first_pixel].astype(np.int64)  # one class per key by construction
    valid = (np.arange(len(key_area)) > 0) & (key_area >= max(min_area, 1))
    n_id = np.full(len(key_area), -1, dtype=np.int64)
    for t in THING_TRAIN_IDS:
        members = _largest_kept(np.flatnonzero(valid & (seg_class == t)), key_area)
        n_id[members] = np.arange(members.size)
    kept = np.flatnonzero(n_id >= 0)  # in key order: by class, then n
    seg_id = np.zeros(len(key_area), dtype=np.int64)
    seg_id[kept] = TRAIN_ID_TO_LABEL_ID[seg_class[kept]].astype(np.int64) * 1000 + n_id[kept]
    ids = np.where(thing_mask, seg_id[key], ids).astype(np.int32)
    return ids, (seg_id[kept], seg_class[kept], key_area[kept])


def instance_ids_map(panoptic: Panoptic, train_ids: np.ndarray) -> np.ndarray:
    """(H, W) uint16 Cityscapes-format instanceIds: labelId*1000 + n on thing instances, the
    labelId elsewhere (stuff, and thing pixels without an instance), 0 on ignore."""
    if panoptic.ids.shape != train_ids.shape:
        raise ValueError(f"panoptic shape {panoptic.ids.shape} and trainIds shape {train_ids.shape} differ")
    label = np.zeros(256, dtype=np.int64)
    label[:NUM_CLASSES] = TRAIN_ID_TO_LABEL_ID
    out = np.where(panoptic.ids >= 1000, panoptic.ids, label[train_ids.astype(np.int64)])
    return out.astype(np.uint16)
