"""Report diagnostics: exact answers on small matrices."""

import numpy as np
import pytest

from core.reporting.analysis import absorption_table, cluster_purity, dead_centroid_summary, dead_centroids


def test_dead_centroids():
    wins = np.array([5, 0, 3, 0, 0, 1])
    assert dead_centroids(wins).tolist() == [1, 3, 4]
    assert dead_centroid_summary(wins) == {"k": 6, "dead": 3, "dead_fraction": 0.5, "dead_ids": [1, 3, 4]}
    assert dead_centroids(np.ones(4)).tolist() == []
    with pytest.raises(ValueError):
        dead_centroids(np.zeros((2, 2)))


def test_absorption_table_with_unassigned_column():
    names = ["road", "wall", "pole"]
    conf = np.array(
        [
            [80, 5, 0, 15],  # road: 15 % unassigned, 5 % wall
            [30, 10, 30, 30],  # wall: three-way tie at 0.3 -> column order (road, pole)
            [0, 0, 0, 0],  # pole: no pixels
        ]
    )
    rows = absorption_table(conf, names)
    assert rows[0] == {
        "class": "road",
        "pixels": 100,
        "correct": 0.8,
        "absorbed_by": [{"class": "unassigned", "share": 0.15}, {"class": "wall", "share": 0.05}],
    }
    assert rows[1]["correct"] == 0.1
    assert rows[1]["absorbed_by"] == [{"class": "road", "share": 0.3}, {"class": "pole", "share": 0.3}]
    assert rows[2] == {"class": "pole", "pixels": 0, "correct": None, "absorbed_by": []}


def test_absorption_table_skips_zero_shares_and_square_matrix():
    rows = absorption_table(np.array([[9, 1], [0, 4]]), ["a", "b"], top=2)
    assert rows[0]["absorbed_by"] == [{"class": "b", "share": 0.1}]
    assert rows[1] == {"class": "b", "pixels": 4, "correct": 1.0, "absorbed_by": []}
    with pytest.raises(ValueError):
        absorption_table(np.zeros((2, 4)), ["a", "b"])


def test_cluster_purity():
    counts = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 2]])
    r = cluster_purity(counts)
    assert r["size"].tolist() == [10, 0, 4]
    assert r["majority"].tolist() == [0, -1, 2]
    assert r["purity"][0] == 0.8 and np.isnan(r["purity"][1]) and r["purity"][2] == 0.5
    assert r["weighted_purity"] == pytest.approx(10 / 14)
    assert np.isnan(cluster_purity(np.zeros((2, 3)))["weighted_purity"])
