"""Mapping protocols: how much of the overclustering gain survives without the paper's oracle.

The paper maps each cluster to the majority class of its patches over the very images it then
scores ("same-set"); as k grows this approaches an oracle. Two honest alternatives:
- held-out: the mapping of images in fold f comes only from the patches of the other folds
  (n-fold cross-validation over images); scores are pooled over folds, and given per fold;
- label-free: each cluster takes the class of the baseline cluster (CAUSE's 27-centroid probe,
  or a k = C fit) that most of its patches are nearest to; ground truth enters only through the
  baseline's standard one-to-one Hungarian match, as CAUSE and STEGO evaluate;
- few-shot: each cluster takes the majority class of m labelled patches drawn at random from the
  other folds (what a person naming a cluster from m thumbnails would do), averaged over draws.

Every protocol is a (k,) mapping, and a (k, C) table of (cluster, class) pixel counts scores any
mapping, so images are labelled once and scored under all protocols.
"""

import numpy as np

from core.classes import IGNORE
from core.evaluation.metrics import semantic_scores
from core.mapping.majority import majority_mapping


def confusion_from_cluster_counts(counts: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(k, C) cluster x class counts + (k,) mapping -> (C, C+1) confusion; column C = unassigned."""
    k, num_classes = counts.shape
    if mapping.shape != (k,):
        raise ValueError(f"mapping has shape {mapping.shape}, expected ({k},)")
    conf = np.zeros((num_classes, num_classes + 1), np.int64)
    cols = np.where(mapping == IGNORE, num_classes, mapping)
    np.add.at(conf.T, cols, counts)
    return conf


def heldout_mappings(fold_counts: np.ndarray) -> np.ndarray:
    """(F, k, C) per-fold mapping counts -> (F, k) mappings, fold f's from the other folds only."""
    total = fold_counts.sum(axis=0)
    return np.stack([majority_mapping(total - fold_counts[f]) for f in range(len(fold_counts))])


def label_free_mapping(co_assignment: np.ndarray, baseline_mapping: np.ndarray) -> np.ndarray:
    """(k, k_base) patch co-assignment counts to the baseline's clusters + the baseline's (k_base,)
    class mapping -> (k,) mapping. A cluster with no patches keeps the baseline cluster 0's class."""
    return baseline_mapping[co_assignment.argmax(axis=1)]


def protocol_scores(
    pixel_counts: np.ndarray,
    mapping_counts: np.ndarray,
    same_set: np.ndarray,
    label_free: np.ndarray | None,
    class_names: list[str],
    miou_rule: str = "present",
) -> dict:
    """Score one fit under every protocol.

    pixel_counts (F, k, C): (nearest cluster, GT class) pixel counts of the scored images per fold;
    mapping_counts (F, k, C): the labelled-patch counts the mappings are made from, per fold;
    miou_rule: how each mIoU averages the classes (`core.evaluation.metrics.MIOU_RULES`).
    """

    def scores(conf: np.ndarray) -> dict:
        return semantic_scores(conf, class_names, miou_rule)

    total = pixel_counts.sum(axis=0)
    out = {"same_set": scores(confusion_from_cluster_counts(total, same_set))}
    # Held out needs labelled patches outside every scored fold: with one labelled image (or all
    # in one fold) it is undefined, and left out.
    labelled_folds = int((mapping_counts.sum(axis=(1, 2)) > 0).sum())
    if len(pixel_counts) > 1 and labelled_folds > 1:
        mappings = heldout_mappings(mapping_counts)
        per_fold = [confusion_from_cluster_counts(pixel_counts[f], mappings[f]) for f in range(len(mappings))]
        fold_miou = [scores(c)["miou"] for c in per_fold if c.sum() > 0]
        out["held_out"] = {
            **scores(sum(per_fold)),
            "folds": len(mappings),
            "fold_miou_mean": float(np.mean(fold_miou)),
            "fold_miou_std": float(np.std(fold_miou)),
        }
    if label_free is not None:
        out["label_free"] = scores(confusion_from_cluster_counts(total, label_free))
    return out


def few_shot_scores(
    pixel_counts: np.ndarray,
    mapping_counts: np.ndarray,
    shots: list[int],
    draws: int,
    seed: int,
    class_names: list[str],
) -> dict:
    """Per m in `shots`: the pooled-over-folds mIoU and pixel accuracy (mean and std over `draws`
    seeded draws) when fold f's clusters take the majority class of m labelled patches drawn
    without replacement from the other folds (all of a cluster's patches where it has fewer; ties
    -> lowest class id, as `majority_mapping`). A cluster without labelled patches there keeps
    `majority_mapping`'s guess. Needs two labelled folds, as held-out does; else {}."""
    if len(pixel_counts) < 2 or int((mapping_counts.sum(axis=(1, 2)) > 0).sum()) < 2:
        return {}
    total = mapping_counts.sum(axis=0)
    pools = [total - mapping_counts[f] for f in range(len(mapping_counts))]
    fallbacks = [majority_mapping(pool) for pool in pools]
    out = {}
    for m in shots:
        mious, accuracies = [], []
        for draw in range(draws):
            rng = np.random.default_rng([seed, m, draw])
            confusion = 0
            for f, (pool, fallback) in enumerate(zip(pools, fallbacks)):
                mapping = fallback.copy()
                for cluster in np.flatnonzero(pool.sum(axis=1)):
                    drawn = rng.multivariate_hypergeometric(pool[cluster], min(m, int(pool[cluster].sum())))
                    mapping[cluster] = int(drawn.argmax())
                confusion = confusion + confusion_from_cluster_counts(pixel_counts[f], mapping)
            scores = semantic_scores(confusion, class_names)
            mious.append(np.nan if scores["miou"] is None else scores["miou"])
            accuracies.append(np.nan if scores["pixel_accuracy"] is None else scores["pixel_accuracy"])
        out[str(m)] = {
            "miou_mean": float(np.mean(mious)),
            "miou_std": float(np.std(mious)),
            "pixel_accuracy_mean": float(np.mean(accuracies)),
            "draws": draws,
        }
    return out
