"""Cityscapes label facts: the 19 evaluation classes, their labelIds, colours and thing flags.

One table, so that readers, the demo generator, metrics and writers agree on every id.
"""

import numpy as np

IGNORE = 255  # trainId of every pixel that is not one of the 19 evaluation classes

# (name, labelId, trainId, colour, is_thing) for the 19 evaluation classes, in trainId order.
EVAL_CLASSES = [
    ("road", 7, 0, (128, 64, 128), False),
    ("sidewalk", 8, 1, (244, 35, 232), False),
    ("building", 11, 2, (70, 70, 70), False),
    ("wall", 12, 3, (102, 102, 156), False),
    ("fence", 13, 4, (190, 153, 153), False),
    ("pole", 17, 5, (153, 153, 153), False),
    ("traffic light", 19, 6, (250, 170, 30), False),
    ("traffic sign", 20, 7, (220, 220, 0), False),
    ("vegetation", 21, 8, (107, 142, 35), False),
    ("terrain", 22, 9, (152, 251, 152), False),
    ("sky", 23, 10, (70, 130, 180), False),
    ("person", 24, 11, (220, 20, 60), True),
    ("rider", 25, 12, (255, 0, 0), True),
    ("car", 26, 13, (0, 0, 142), True),
    ("truck", 27, 14, (0, 0, 70), True),
    ("bus", 28, 15, (0, 60, 100), True),
    ("train", 31, 16, (0, 80, 100), True),
    ("motorcycle", 32, 17, (0, 0, 230), True),
    ("bicycle", 33, 18, (119, 11, 32), True),
]

NUM_CLASSES = len(EVAL_CLASSES)  # 19
CLASS_NAMES = [c[0] for c in EVAL_CLASSES]
TRAIN_ID_TO_LABEL_ID = np.array([c[1] for c in EVAL_CLASSES], dtype=np.uint8)
TRAIN_ID_COLORS = np.array([c[3] for c in EVAL_CLASSES], dtype=np.uint8)  # (19, 3)
THING_TRAIN_IDS = [c[2] for c in EVAL_CLASSES if c[4]]  # 11..18
STUFF_TRAIN_IDS = [c[2] for c in EVAL_CLASSES if not c[4]]  # 0..10

# labelId -> trainId lookup over the whole uint8 range; every other labelId is ignored.
# Unknown labelIds (> 33, which Cityscapes never writes) also map to IGNORE: readers that
# must reject them check `labelId <= MAX_LABEL_ID` themselves.
MAX_LABEL_ID = 33
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE, dtype=np.uint8)
LABEL_ID_TO_TRAIN_ID[TRAIN_ID_TO_LABEL_ID] = np.arange(NUM_CLASSES, dtype=np.uint8)

# The 27-class protocol of STEGO / CAUSE: labelIds 7..33 map to 0..26, the rest is ignored.
NUM_CLASSES_27 = 27
LABEL_ID_TO_CLASS_27 = np.full(256, IGNORE, dtype=np.uint8)
LABEL_ID_TO_CLASS_27[7:34] = np.arange(NUM_CLASSES_27, dtype=np.uint8)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """(H, W) uint8 labelIds -> (H, W) uint8 trainIds (255 = ignore)."""
    return LABEL_ID_TO_TRAIN_ID[label_ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) trainIds (255 = ignore) -> (H, W) uint8 labelIds (0 = unlabeled for ignore)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:NUM_CLASSES] = TRAIN_ID_TO_LABEL_ID
    return lut[train_ids]


def colorize_train_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) uint8 Cityscapes colours; ignore is black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:NUM_CLASSES] = TRAIN_ID_COLORS
    return palette[train_ids]
