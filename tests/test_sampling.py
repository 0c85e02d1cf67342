import numpy as np

from core.clustering.sampling import BoundedSample, patch_priorities, per_image_lowest


def _sample(image_ids: np.ndarray, cap: int, seed: int) -> set[tuple[str, int]]:
    """(image id, index among the image's rows) of the rows chosen per image."""
    prio, index = patch_priorities(image_ids, seed)
    rows = per_image_lowest(prio, index, cap)
    first = {i: int(np.flatnonzero(image_ids == i)[0]) for i in np.unique(image_ids)}
    return {(str(image_ids[r]), int(r) - first[image_ids[r]]) for r in rows}


def test_per_image_cap_and_all_rows_when_under_cap():
    ids = np.array(["a"] * 5 + ["b"] * 2)
    chosen = _sample(ids, cap=3, seed=0)
    assert sum(i == "a" for i, _ in chosen) == 3 and sum(i == "b" for i, _ in chosen) == 2


def test_choice_depends_on_the_image_not_on_its_neighbours():
    """Sharding must not change the sample: an image's rows are chosen the same wherever it lies."""
    alone = _sample(np.array(["x"] * 10), cap=4, seed=7)
    mixed = _sample(np.array(["w"] * 3 + ["x"] * 10), cap=4, seed=7)
    assert alone == {c for c in mixed if c[0] == "x"}
    assert _sample(np.array(["x"] * 10), cap=4, seed=8) != alone


def test_bounded_sample_is_the_same_however_the_rows_are_split():
    rng = np.random.default_rng(0)
    ids = np.repeat([f"img{i}" for i in range(40)], 25)
    rows = rng.normal(size=(len(ids), 3)).astype(np.float32)
    whole = BoundedSample(100)
    prio, _ = patch_priorities(ids, 0)
    whole.add(prio, rows)
    split = BoundedSample(100)
    for images in np.array_split(np.arange(40), 7)[::-1]:  # other shard boundaries and order
        part = (np.arange(len(ids))[:, None] // 25 == images[None]).any(axis=1).nonzero()[0]
        p, _ = patch_priorities(ids[part], 0)
        split.add(p, rows[part])
        assert len(split.rows) <= 100  # never holds more than the bound
    assert np.array_equal(whole.result(), split.result()) and len(whole.result()) == 100
