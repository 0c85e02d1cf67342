"""The generated demo set: synthetic street scenes written in the Cityscapes format.

Why it exists: no dataset can be downloaded here, yet a newcomer should see the whole method
work in minutes. The scenes follow Cityscapes' statistics closely enough for the method's
central effect to appear: large stuff classes (road, building, sky, vegetation) carry most
pixels and much internal variation (lighting, gradients, texture), while rare small classes
(traffic lights, signs, riders, motorcycles, trains) cover a few patches each. A k-means with
k = 19 spends its centroids on the variation of the big classes and misses rare ones;
overclustering leaves room for them.

Layout as Cityscapes ships it:
  leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png   RGB uint8
  gtFine/{split}/{city}/..._gtFine_labelIds.png                              labelId uint8
  gtFine/{split}/{city}/..._gtFine_instanceIds.png                           uint16, labelId*1000+n for things
Rare objects are sized to cover whole 16 px cells (the demo's patch size in image pixels), since a
thinner object never wins a patch's majority label and could not be recovered by any method.
"""

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.classes import CLASS_NAMES, TRAIN_ID_TO_LABEL_ID
from storage.images import safe_path, write_png_atomic
from storage.run.atomic import write_text_atomic

DEMO_CITIES = ("frankfurt", "lindau", "munster")
LABEL_ID = {name: int(TRAIN_ID_TO_LABEL_ID[t]) for t, name in enumerate(CLASS_NAMES)}
EGO_VEHICLE_LABEL_ID = 1  # void in Cityscapes: the car bonnet at the bottom of every frame
STATIC_LABEL_ID = 4  # void: unlabelled clutter


@dataclass(frozen=True)
class ClassLook:
    """Colour and texture statistics of one class."""

    rgb: tuple[int, int, int]
    texture: str  # smooth | noise | stripes_h | stripes_v | stripes_d | grid | windows | checker | blobs
    period: float = 8.0
    contrast: float = 20.0


LOOKS = {
    "road": ClassLook((88, 80, 96), "noise", contrast=10),
    "sidewalk": ClassLook((172, 140, 160), "grid", period=10, contrast=22),
    "building": ClassLook((112, 100, 88), "windows", period=12, contrast=35),
    "wall": ClassLook((168, 156, 118), "stripes_h", period=6, contrast=28),
    "fence": ClassLook((136, 104, 70), "stripes_d", period=7, contrast=40),
    "pole": ClassLook((158, 158, 168), "stripes_v", period=16, contrast=12),
    "traffic light": ClassLook((40, 44, 30), "checker", period=8, contrast=60),
    "traffic sign": ClassLook((224, 210, 20), "smooth", contrast=8),
    "vegetation": ClassLook((66, 124, 40), "blobs", period=5, contrast=40),
    "terrain": ClassLook((160, 184, 110), "noise", contrast=25),
    "sky": ClassLook((140, 182, 232), "smooth", contrast=6),
    "person": ClassLook((176, 60, 72), "stripes_v", period=5, contrast=30),
    "rider": ClassLook((214, 96, 24), "stripes_h", period=5, contrast=35),
    "car": ClassLook((36, 48, 150), "smooth", contrast=14),
    "truck": ClassLook((70, 78, 60), "stripes_v", period=9, contrast=30),
    "bus": ClassLook((28, 112, 120), "stripes_h", period=14, contrast=35),
    "train": ClassLook((150, 40, 150), "stripes_d", period=10, contrast=30),
    "motorcycle": ClassLook((250, 110, 230), "checker", period=5, contrast=50),
    "bicycle": ClassLook((140, 250, 40), "stripes_d", period=4, contrast=45),
}
VOID_LOOK = ClassLook((60, 60, 60), "noise", contrast=15)


def _texture(look: ClassLook, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) zero-mean pattern in [-1, 1] for a class, with a random phase per image."""
    p = look.period
    py, px = rng.uniform(0, p, 2)
    y, x = yy + py, xx + px
    if look.texture == "smooth":
        return np.zeros_like(yy)
    if look.texture == "noise":
        return rng.uniform(-1, 1, yy.shape)
    if look.texture == "stripes_h":
        return np.sign(np.sin(2 * np.pi * y / p))
    if look.texture == "stripes_v":
        return np.sign(np.sin(2 * np.pi * x / p))
    if look.texture == "stripes_d":
        return np.sign(np.sin(2 * np.pi * (x + y) / p))
    if look.texture == "checker":
        return np.sign(np.sin(np.pi * x / p) * np.sin(np.pi * y / p))
    if look.texture == "grid":
        return np.where((np.mod(x, p) < 1.5) | (np.mod(y, p) < 1.5), -1.0, 0.3)
    if look.texture == "windows":
        return np.where((np.mod(x, p) < p * 0.45) & (np.mod(y, p * 1.3) < p * 0.6), -1.0, 0.4)
    if look.texture == "blobs":
        coarse = rng.uniform(-1, 1, (yy.shape[0] // 4 + 2, yy.shape[1] // 4 + 2))
        blobs = np.kron(coarse, np.ones((4, 4)))[: yy.shape[0], : yy.shape[1]]
        return 0.6 * blobs + 0.4 * rng.uniform(-1, 1, yy.shape)
    raise ValueError(f"unknown texture {look.texture!r}")


class _Canvas:
    """Label and instance maps painted back to front, like a painter's algorithm."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.label_ids = np.zeros((height, width), np.uint8)  # 0 = unlabeled (void)
        self.instance_ids = np.zeros((height, width), np.uint16)
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float64)
        self.next_instance = {}

    def paint(self, mask: np.ndarray, label_id: int, is_thing: bool = False) -> None:
        self.label_ids[mask] = label_id
        if is_thing:
            n = self.next_instance.get(label_id, 0)
            self.next_instance[label_id] = n + 1
            self.instance_ids[mask] = label_id * 1000 + n
        else:
            self.instance_ids[mask] = label_id

    def rect(self, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
        return (self.yy >= y0) & (self.yy < y1) & (self.xx >= x0) & (self.xx < x1)

    def ellipse(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0


def _layout(rng: np.random.Generator, height: int, width: int) -> _Canvas:
    """Paint one street scene's labelIds and instanceIds."""
    c = _Canvas(height, width)
    cell = 16 * height / 256  # one patch of the demo's grid, in image pixels
    horizon = height * rng.uniform(0.45, 0.55)
    vx = width * rng.uniform(0.4, 0.6)  # vanishing point

    # Sky, then a skyline of buildings of random heights down to the horizon.
    c.paint(c.yy < horizon, LABEL_ID["sky"])
    x = 0.0
    while x < width:
        bw = rng.uniform(3, 8) * cell
        top = horizon - rng.uniform(0.15, 0.42) * height
        c.paint(c.rect(top, horizon, x, x + bw), LABEL_ID["building"])
        x += bw
    # Trees in front of buildings.
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, width), horizon - rng.uniform(0.05, 0.2) * height
        c.paint(c.ellipse(cy, cx, rng.uniform(2, 4) * cell, rng.uniform(2, 5) * cell), LABEL_ID["vegetation"])

    # Ground: terrain verges, sidewalks and the road converging to the vanishing point.
    below = c.yy >= horizon
    c.paint(below, LABEL_ID["vegetation"] if rng.random() < 0.3 else LABEL_ID["terrain"])
    depth = np.clip((c.yy - horizon) / (height - horizon), 0, 1)  # 0 at horizon, 1 at bottom
    road_half = depth * width * rng.uniform(0.35, 0.5) + 0.5 * cell
    walk = depth * width * rng.uniform(0.18, 0.28) + 0.5 * cell
    dist = np.abs(c.xx - vx)
    c.paint(below & (dist < road_half + walk), LABEL_ID["sidewalk"])
    c.paint(below & (dist < road_half), LABEL_ID["road"])

    # Wall and fence segments along the horizon (uncommon, a few cells high).
    for name, p in (("wall", 0.45), ("fence", 0.45)):
        if rng.random() < p:
            x0 = rng.uniform(0, width * 0.7)
            seg_h = rng.uniform(1.5, 3) * cell
            c.paint(c.rect(horizon - seg_h, horizon + 0.3 * cell, x0, x0 + rng.uniform(4, 10) * cell), LABEL_ID[name])

    # Poles on the sidewalks, some carrying a traffic light or a sign (small, rare classes).
    for _ in range(rng.integers(1, 4)):
        side = rng.choice([-1, 1])
        base_y = horizon + rng.uniform(0.15, 0.45) * (height - horizon)
        d = (base_y - horizon) / (height - horizon)
        px = vx + side * (d * width * 0.45 + 1.0 * cell)
        top = base_y - rng.uniform(5, 8) * cell
        c.paint(c.rect(top, base_y, px - 0.5 * cell, px + 0.5 * cell), LABEL_ID["pole"])
        r = rng.random()
        if r < 0.45:
            c.paint(
                c.rect(top - 0.5 * cell, top + 2.5 * cell, px - 0.8 * cell, px + 1.2 * cell), LABEL_ID["traffic light"]
            )
        elif r < 0.9:
            c.paint(c.rect(top, top + 1.6 * cell, px - 0.8 * cell, px + 0.8 * cell), LABEL_ID["traffic sign"])

    # Things, far to near so nearer instances occlude farther ones.
    things = []
    for name, p, n_max in (
        ("car", 0.95, 4),
        ("person", 0.8, 4),
        ("truck", 0.2, 1),
        ("bus", 0.15, 1),
        ("train", 0.07, 1),
        ("rider", 0.3, 1),
        ("motorcycle", 0.3, 1),
        ("bicycle", 0.3, 2),
    ):
        if rng.random() < p:
            things += [
                (name, horizon + rng.uniform(0.2, 0.95) * (height - horizon)) for _ in range(rng.integers(1, n_max + 1))
            ]
    things.sort(key=lambda t: t[1])
    for name, base_y in things:
        scale = 0.5 + 0.7 * (base_y - horizon) / (height - horizon)  # nearer is larger
        on_walk = name in ("person", "bicycle")
        side = rng.choice([-1, 1])
        d = (base_y - horizon) / (height - horizon)
        spread = d * width * (0.5 if on_walk else 0.3)
        cx = vx + side * rng.uniform(0.6, 1.0) * spread if on_walk else vx + rng.uniform(-1, 1) * spread
        w_cells, h_cells = {
            "car": (5, 2.5),
            "person": (1.2, 3.2),
            "truck": (7, 4.5),
            "bus": (9, 4.5),
            "train": (14, 4.5),
            "rider": (1.6, 2.8),
            "motorcycle": (3.5, 2.2),
            "bicycle": (2.5, 1.6),
        }[name]
        bw, bh = max(1.0, w_cells * scale) * cell, max(1.0, h_cells * scale) * cell
        box = c.rect(base_y - bh, base_y, cx - bw / 2, cx + bw / 2)
        if name == "rider":  # a rider sits on a bicycle: paint the bicycle below first
            c.paint(
                c.rect(base_y, base_y + 1.6 * scale * cell, cx - 1.25 * scale * cell, cx + 1.25 * scale * cell),
                LABEL_ID["bicycle"],
                is_thing=True,
            )
        c.paint(box, LABEL_ID[name], is_thing=True)

    # Void: the ego vehicle's bonnet along the bottom edge and an unlabelled clutter box.
    c.paint(c.yy >= height - rng.uniform(0.04, 0.08) * height, EGO_VEHICLE_LABEL_ID)
    if rng.random() < 0.5:
        x0, y0 = rng.uniform(0, width - 2 * cell), rng.uniform(horizon, height - 3 * cell)
        c.paint(c.rect(y0, y0 + 1.5 * cell, x0, x0 + 2 * cell), STATIC_LABEL_ID)
    return c


def render_scene(
    rng: np.random.Generator, height: int, width: int, tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene -> (RGB (H,W,3) uint8, labelIds (H,W) uint8, instanceIds (H,W) uint16); `tint`
    scales the channels (another camera's white balance)."""
    c = _layout(rng, height, width)
    rgb = np.zeros((height, width, 3), np.float64)
    light = rng.uniform(0.7, 1.25)  # per-image exposure
    shade = 1.0 - 0.35 * rng.random() * (c.xx / width if rng.random() < 0.5 else 1 - c.xx / width)  # side shadow
    for name, look in [*LOOKS.items(), ("void", VOID_LOOK)]:
        mask = (
            c.label_ids == LABEL_ID[name]
            if name != "void"
            else np.isin(c.label_ids, (0, EGO_VEHICLE_LABEL_ID, STATIC_LABEL_ID))
        )
        if not mask.any():
            continue
        base = np.array(look.rgb, np.float64) * rng.uniform(0.85, 1.15, 3)  # per-image colour jitter
        pattern = _texture(look, c.yy, c.xx, rng)[mask]
        gradient = 1.0
        if name == "sky":  # brighter toward the horizon
            gradient = (0.75 + 0.35 * c.yy / height)[mask]
        rgb[mask] = base[None] * (light * shade[mask] * gradient)[:, None] + (look.contrast * pattern)[:, None]
    rgb *= np.asarray(tint, np.float64)
    rgb += rng.normal(0, 6, rgb.shape)  # sensor noise
    return np.clip(rgb, 0, 255).astype(np.uint8), c.label_ids, c.instance_ids


def demo_image_id(city: str, index: int) -> str:
    return f"{city}_{index:06d}_000019"


def generate_demo_dataset(
    root: Path,
    split: str = "val",
    num_images: int = 100,
    height: int = 256,
    width: int = 512,
    seed: int = 0,
    cities: tuple[str, ...] = DEMO_CITIES,
    workers: int = 1,
) -> list[str]:
    """Write `num_images` scenes under `root` in the Cityscapes layout; return their image ids.

    Deterministic: image i depends only on (seed, i), so a re-run rewrites identical files and an
    interrupted run can simply be started again. Every file is written atomically. `workers` > 1
    renders the scenes in that many processes (the same files).
    """
    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    root = Path(root)
    jobs = [(root, split, seed, i, height, width, cities[i % len(cities)]) for i in range(num_images)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            ids = list(pool.map(_write_demo_scene, *zip(*jobs), chunksize=4))
    else:
        ids = [_write_demo_scene(*job) for job in jobs]
    write_text_atomic(
        f"Synthetic demo set: {num_images} street scenes, {height}x{width}, seed {seed}, split {split!r}.\n"
        "Generated by `python submit.py synth`; not Cityscapes data. Layout and label ids follow Cityscapes.\n",
        root / "DEMO_DATASET.txt",
    )
    return ids


def _write_demo_scene(root: Path, split: str, seed: int, i: int, height: int, width: int, city: str) -> str:
    image_id = demo_image_id(city, i)
    rgb, label_ids, instance_ids = render_scene(np.random.default_rng([seed, i]), height, width)
    write_png_atomic(label_ids, safe_path(root, "gtFine", split, city, f"{image_id}_gtFine_labelIds.png"))
    write_png_atomic(instance_ids, safe_path(root, "gtFine", split, city, f"{image_id}_gtFine_instanceIds.png"))
    # The image goes last: a dataset listing only sees images whose ground truth is complete.
    write_png_atomic(rgb, safe_path(root, "leftImg8bit", split, city, f"{image_id}_leftImg8bit.png"))
    return image_id


UNLABELLED_TINT = (1.12, 0.97, 0.82)  # a warmer camera than the labelled set's


def generate_unlabelled_frames(
    root: Path,
    num_images: int = 200,
    height: int = 256,
    width: int = 512,
    seed: int = 1,
    tint: tuple[float, float, float] = UNLABELLED_TINT,
    frames_per_drive: int = 50,
) -> list[str]:
    """A folder of unlabelled "dashcam" frames: the demo's street scenes from other seeds, through
    another camera's colours, without ground truth: `root/drive_NN/frame_NNNNNN.png`
    (`dataset.kind: folder`). Deterministic in (seed, i); written atomically."""
    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    root, names = Path(root), []
    for i in range(num_images):
        rgb, _, _ = render_scene(np.random.default_rng([seed, i]), height, width, tint)
        name = f"drive_{i // frames_per_drive:02d}/frame_{i:06d}.png"
        write_png_atomic(rgb, safe_path(root, *name.split("/")))
        names.append(name)
    write_text_atomic(
        f"Synthetic unlabelled frames: {num_images} street scenes, {height}x{width}, seed {seed}, "
        f"colour tint {tint}, no ground truth.\nGenerated by `python submit.py synth --unlabelled`; "
        "not real data.\n",
        root / "FRAMES.txt",
    )
    return names
