import numpy as np

from core.sampling import per_image_sample, subsample


def test_per_image_cap_and_all_rows_when_under_cap():
    ids = np.array(["a"] * 5 + ["b"] * 2)
    rows = per_image_sample(ids, cap=3, seed=0)
    assert (ids[rows] == "a").sum() == 3 and (ids[rows] == "b").sum() == 2
    assert np.all(np.diff(rows) > 0)


def test_choice_depends_on_the_image_not_on_its_neighbours():
    """Sharding must not change the sample: an image's rows are chosen the same wherever it lies."""
    a = np.array(["x"] * 10)
    alone = per_image_sample(a, cap=4, seed=7)
    mixed = per_image_sample(np.array(["w"] * 3 + ["x"] * 10), cap=4, seed=7)
    chosen_x = mixed[mixed >= 3] - 3
    assert np.array_equal(alone, chosen_x)
    assert not np.array_equal(per_image_sample(a, cap=4, seed=8), alone)


def test_subsample():
    assert np.array_equal(subsample(3, 5, 0), [0, 1, 2])
    s = subsample(100, 10, 0)
    assert len(s) == 10 and len(set(s)) == 10 and np.array_equal(s, subsample(100, 10, 0))
