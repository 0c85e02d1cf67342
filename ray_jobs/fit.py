"""Fit stage: sample patch features, fit k-means for every k, map clusters to classes.

It reads the features of a complete extract stage only (its plan, every planned shard, every
file checked against its marker's checksum). The passes over every shard are Ray tasks, their
results tree-reduced (`ray_jobs.shard_tasks`): the fit sample (fit.max_samples rows, chosen by
priority: `core.clustering.sampling`), the cluster x class counts that drive the mapping (over all patches,
not only the sample) and `fit.lloyd_iterations` (`ray_jobs.distributed_lloyd`). The driver holds
the sample, the centroids and the reduced counts; k-means++ and the sampled faiss fit run there.
"""

import logging
import time
from dataclasses import dataclass

import numpy as np
import ray
import scipy.sparse

from configs.geometry import HEAD_FEATURE_DIM
from configs.schema import RunConfig
from configs.specs import model_spec
from core.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from core.clustering.codebook_merge import (
    Codebook,
    CodebookMergeSettings,
    GraphPartial,
    add_graph_partials,
    fit_codebook,
    graph_partial,
    merged_centroids,
)
from core.clustering.fit_artifact import FitArtifact
from core.clustering.kmeans import (
    PAPER_MINIBATCH,
    assign_clusters,
    assign_euclidean,
    check_features,
    fit_kmeans,
    fit_paper_minibatch,
    l2_normalize,
)
from core.clustering.sampling import image_fold
from core.mapping.majority import hungarian_mapping, majority_mapping
from core.mapping.protocols import label_free_mapping, protocol_scores
from core.models import load_cluster_probe
from core.presets import protocol_steps
from core.refine.paper_heuristics import class_prototypes, normalized_rows
from ray_jobs.distributed_lloyd import distributed_lloyd
from ray_jobs.shard_tasks import add_arrays, map_reduce_shards, sample_patches
from storage.features import backbone_path, features_from_table
from storage.run.feature_sets import (
    FeatureSet,
    FeatureSetError,
    FeatureShards,
    Sources,
    open_feature_set,
    own_feature_set,
    refuse_repeated_content,
)
from storage.run.fits import (
    BACKBONE_COMPARISON,
    FitError,
    baseline_name,
    extracted_model,
    fit_inputs,
    fit_names,
    load_existing_fits,
    save_fits,
)
from storage.run.layout import Layout
from storage.run.plans import Plan, plan_conflict, refuse_conflicts, require_complete

log = logging.getLogger(__name__)


def baseline_centroids(cfg: RunConfig, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """CAUSE's 27 cluster-probe centroids, or a k = 19 k-means fit where there is no probe."""
    if cfg.fit.baseline == "cluster_probe":
        return l2_normalize(load_cluster_probe(model_spec(cfg).cluster_probe_checkpoint)), None
    return fit_centroids(cfg, sample, NUM_CLASSES)


# The fix for a mapping set without ground truth, refused from its markers (`fit_feature_sets`) or, for
# sets extracted before the markers counted labelled patches, once its clusters are counted.
MAP_ON_LABELLED = (
    "Map on a labelled run's features (fit.mapping_from=<its output_dir>, fit.heldout_folds=1), or label these "
    "images with a fit saved from a labelled run (`python submit.py apply --fit ...`)"
)


def fit_feature_sets(
    cfg: RunConfig, extract: Plan, markers: dict[str, dict], dataset_fingerprint: str
) -> tuple[Sources, FeatureSet]:
    """The feature sets of `fit.features` (the fit's union) and of `fit.mapping_from` (the mapping),
    each complete and made by this run's model; this run's own where the config names none."""
    layout = Layout(cfg.output_dir)
    own = own_feature_set(layout.features, markers, dataset_fingerprint)
    model = extract.settings["model"]

    def named(path: str | None, role: str) -> FeatureSet:  # this run's own folder is refused by the config (output_dir)
        return own if path is None else open_feature_set(path, model, role)

    sources = [(named(s.path, "fit.features"), s) for s in cfg.fit.features]
    refuse_repeated_content([fs for fs, _ in sources])
    mapping = named(cfg.fit.mapping_from, "fit.mapping_from")
    if mapping.num_patches and mapping.num_labelled_patches == 0:  # refused before k-means, not after it
        where = (
            "this run's own features" if cfg.fit.mapping_from is None else f"fit.mapping_from={cfg.fit.mapping_from!r}"
        )
        raise FeatureSetError(
            f"{where}: its patches have no ground truth, so no cluster can be mapped to a class. {MAP_ON_LABELLED}"
        )
    return sources, mapping


def weight_shares(sources: Sources) -> list[float]:
    """Each source's share of the fit: weight / (sum of weights)."""
    total = sum(s.weight for _, s in sources)
    return [s.weight / total for _, s in sources]


def source_quotas(cfg: RunConfig, sources: Sources) -> list[int]:
    """Each source's rows in the fit sample: its share of fit.max_samples, capped by its max_samples."""
    return [
        max(1, min(int(cfg.fit.max_samples * share), s.max_samples or cfg.fit.max_samples))
        for share, (_, s) in zip(weight_shares(sources), sources)
    ]


def gather_union_sample(cfg: RunConfig, sources: Sources) -> tuple[np.ndarray, list[int]]:
    """The fit sample over every source (its quota from each, in source order) and each one's rows in it."""
    parts = [gather_sample(fs.shards(), cfg, quota) for (fs, _), quota in zip(sources, source_quotas(cfg, sources))]
    filled = [p for p in parts if p.size]
    if len({p.shape[1] for p in filled}) > 1:
        raise FitError(f"the feature sets of fit.features have different widths ({[p.shape[1] for p in filled]})")
    return (np.concatenate(filled) if filled else np.zeros((0, 0), np.float32)), [len(p) for p in parts]


def lloyd_row_weights(sources: Sources) -> list[float]:
    """Per source, the weight of each of its rows in fit.lloyd_iterations: its rows weigh its share
    of the total (1.0 each for a single source)."""
    rows = [fs.num_patches for fs, _ in sources]
    return [share * sum(rows) / n if n else 0.0 for share, n in zip(weight_shares(sources), rows)]


def gather_sample(shards: FeatureShards, cfg: RunConfig, max_rows: int | None = None) -> np.ndarray:
    """(n, D) float32: at most max_patches_per_image rows per image, at most max_rows (default
    fit.max_samples) overall, drawn by Ray tasks (`shard_tasks.sample_patches`): the same rows
    whatever the shard layout or worker count."""
    max_rows = cfg.fit.max_samples if max_rows is None else max_rows
    if protocol_steps(cfg.protocol).kmeans == "paper":
        return labelled_patches(shards, max_rows)
    return sample_patches(shards, cfg.seed, cfg.fit.max_patches_per_image, max_rows, "fit: sampling patches")


PAPER_PATCHES_PER_IMAGE = 2000  # generate_overclustered_semantics.py's max_per_image (a 23x46 grid has 1058)


def labelled_patches(shards: FeatureShards, max_rows: int) -> np.ndarray:
    """The paper's k-means input, in its order (MiniBatchKMeans' batches depend on it): image by
    image in dataset order, the image's labelled patches drawn by one RandomState(42) stream,
    `choice(n, min(2000, n), replace=False)`. More than `max_rows` is refused."""
    rng = np.random.RandomState(PAPER_MINIBATCH["random_state"])
    parts, total, seen = [], 0, 0
    for table in shards.tables(["image_id", "feature", "label"], "fit: gathering labelled patches"):
        seen += table.num_rows
        ids, labelled = (
            table.column("image_id").to_numpy(zero_copy_only=False),
            table.column("label").to_numpy() != IGNORE,
        )
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
        rows = []
        for a, b in zip(starts, np.r_[starts[1:], len(ids)]):  # an image's rows are consecutive
            valid = a + np.flatnonzero(labelled[a:b])
            if len(valid):  # the paper skips an image without labelled patches before drawing
                rows.append(valid[rng.choice(len(valid), min(PAPER_PATCHES_PER_IMAGE, len(valid)), replace=False)])
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        total += len(rows)
        if total > max_rows:
            raise FitError(
                f"protocol=paper fits on the labelled patches of every image (at most {PAPER_PATCHES_PER_IMAGE} "
                f"each), and there are more than fit.max_samples={max_rows} (the paper's Cityscapes val has "
                "~529k): raise fit.max_samples, or use protocol=official"
            )
        parts.append(features_from_table(table.take(rows)))
    if seen == 0:  # every image failed in extract: run_fit says so
        return np.zeros((0, 0), np.float32)
    if total == 0:
        raise FitError(
            "protocol=paper fits k-means on labelled patches only, as the paper's scripts do, and no patch has a "
            "label: the dataset has no ground truth. Label it with a fit saved from a labelled run instead "
            "(`python submit.py apply --fit ...`)"
        )
    return np.concatenate(parts)


def fitted_by(cfg: RunConfig, name: str) -> str:
    """A fit's method in a word or two, for the report's k sweep: the sweep by fit.method, the baseline
    by k-means (or CAUSE's probe)."""
    if name == baseline_name(cfg):
        return "CAUSE's probe" if cfg.fit.baseline == "cluster_probe" else "k-means"
    if protocol_steps(cfg.protocol).kmeans == "paper":
        return "the paper's MiniBatchKMeans"
    return "codebook merge" if cfg.fit.method == "codebook_merge" else "k-means"


def fit_engine(cfg: RunConfig, name: str | None = None) -> str:
    """How a fit was made, as its meta.json says it (`name` None: the k-means of the baseline and the
    backbone comparison)."""
    if protocol_steps(cfg.protocol).kmeans == "paper":
        return "sklearn MiniBatchKMeans, the paper's settings " + ", ".join(
            f"{k}={v}" for k, v in PAPER_MINIBATCH.items()
        )
    if fitted_by(cfg, name or baseline_name(cfg)) == "codebook merge":
        f = cfg.fit
        return (
            f"codebook merge ({f.engine} k-means codebook of {f.codebook_ratio} x k entries on {f.codebook_rows} "
            f"rows each, {f.codebook_iterations} iterations)"
        )
    return cfg.fit.engine


def fit_centroids(cfg: RunConfig, sample: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """One k-means fit: unit centroids, and the paper's raw centres (None under the official protocol)."""
    if protocol_steps(cfg.protocol).kmeans == "paper":
        raw = fit_paper_minibatch(sample, k)
        return l2_normalize(raw), raw
    return fit_kmeans(
        sample,
        k,
        seed=cfg.seed,
        engine=cfg.fit.engine,
        n_iter=cfg.fit.n_iter,
        max_points_per_centroid=cfg.fit.max_points_per_centroid,
    ), None


def _shard_cluster_counts(
    table,
    _index: int,
    centroids: dict[str, np.ndarray],
    raw_centres: dict[str, np.ndarray],
    co_assign_to: str | None,
    folds: int,
    seed: int,
) -> dict:
    """One shard's share of `count_cluster_classes` (a Ray task)."""
    labels = table.column("label").to_numpy().astype(np.int64)
    image_ids = table.column("image_id").to_numpy(zero_copy_only=False)
    fold_of = {i: image_fold(i, folds, seed) for i in np.unique(image_ids)}
    fold = np.array([fold_of[i] for i in image_ids], np.int64)
    keep = labels != IGNORE
    x = features_from_table(table)
    if len(x):  # a shard whose images all failed has no rows
        check_features(x, "patch features")
    assigned = {name: assign_clusters(x, c).astype(np.int64) for name, c in centroids.items()}

    def labelled_counts(ids: np.ndarray, k: int) -> np.ndarray:
        flat = (fold[keep] * k + ids[keep]) * NUM_CLASSES + labels[keep]
        return np.bincount(flat, minlength=folds * k * NUM_CLASSES).reshape(folds, k, NUM_CLASSES)

    out = {
        "counts": {name: labelled_counts(ids, len(centroids[name])) for name, ids in assigned.items()},
        "mapping_counts": {
            name: labelled_counts(assign_euclidean(x, raw).astype(np.int64), len(raw))
            for name, raw in raw_centres.items()
        },
    }
    if co_assign_to is not None:
        main = next(iter(centroids))
        k_base, base = len(centroids[co_assign_to]), assigned[co_assign_to]
        unit = normalized_rows(x)
        out["co_assignment"] = {
            name: np.bincount(ids * k_base + base, minlength=len(centroids[name]) * k_base)
            for name, ids in assigned.items()
            if name != co_assign_to
        }
        out["main_sums"] = (
            scipy.sparse.csr_matrix(
                (np.ones(len(unit)), (assigned[main], np.arange(len(unit)))), shape=(len(centroids[main]), len(unit))
            )
            @ unit
        )
        out["main_sizes"] = np.bincount(assigned[main], minlength=len(centroids[main]))
    return out


def count_cluster_classes(
    shards: FeatureShards,
    centroids: dict[str, np.ndarray],
    raw_centres: dict[str, np.ndarray],
    cfg: RunConfig,
    co_assign_to: str | None = None,
) -> dict:
    """Over every patch of every shard, by Ray tasks (`shard_tasks.map_reduce_shards`): per fit,
    "counts": (F, k, C) labelled-patch counts per held-out fold by cosine to the unit centroids
    (what labelling does); "mapping_counts": the counts the mapping is made from (the paper's:
    Euclidean to its raw centres, where `raw_centres` has the fit; else the cosine counts). With
    `co_assign_to` (the baseline): "co_assignment", per other fit (k, k_base) co-assignment counts
    to it (all patches, labelled or not: the label-free mapping uses no ground truth), and for the
    main fit (the first) per cluster "main_sums" and "main_sizes" of its normalised patch features
    (all patches: prototype denoising's class prototypes come from the pseudo-labels)."""
    total = map_reduce_shards(
        shards,
        ["image_id", "feature", "label"],
        _shard_cluster_counts,
        add_arrays,
        (centroids, raw_centres, co_assign_to, cfg.fit.heldout_folds, cfg.seed),
        desc="fit: mapping clusters",
    )
    if total is None:
        raise FitError("no feature shards to map clusters on: the extract stage has none")
    total["mapping_counts"] = {name: total["mapping_counts"].get(name, c) for name, c in total["counts"].items()}
    if co_assign_to is not None:
        k_base = len(centroids[co_assign_to])
        total["co_assignment"] = {name: c.reshape(-1, k_base) for name, c in total["co_assignment"].items()}
    return total


def refuse_missing_gpus(cfg: RunConfig) -> None:
    """Before any fit is made: Lloyd's tasks would wait forever for a GPU that no node has, or fail
    on one with a library built without CUDA."""
    need = cfg.fit.lloyd_gpus_per_task
    if need == 0 or not cfg.fit.lloyd_iterations:
        return
    if not any(n["Resources"].get("GPU", 0) >= need for n in ray.nodes() if n.get("Alive")):
        raise FitError(
            f"fit.lloyd_gpus_per_task={need:g}, but no node of this Ray cluster has a GPU: set it to 0 "
            "(fit.lloyd_assign then runs on the CPU)"
        )
    if cfg.fit.lloyd_assign == "faiss":
        import faiss

        if not hasattr(faiss, "StandardGpuResources"):
            raise FitError(
                "fit.lloyd_assign=faiss on GPUs needs a faiss built with CUDA, and this one is faiss-cpu: "
                "use fit.lloyd_assign=torch, or install a faiss GPU build on every node"
            )
    if cfg.fit.lloyd_assign == "torch":
        import torch

        if torch.version.cuda is None:
            raise FitError(
                f"fit.lloyd_assign=torch on GPUs needs a CUDA build of torch, and this one ({torch.__version__}) "
                "has none: install one on every node, or set fit.lloyd_gpus_per_task=0"
            )


@dataclass
class FitSources:
    """What the fits are made from: extract's markers, the sets fitted on and mapped on, their content key."""

    markers: dict[str, dict]
    sources: Sources
    mapping_set: FeatureSet
    key: str


@dataclass
class Fitted:
    """Every fit's centroids (and the paper's raw centres), time and Lloyd history, and the sample's size."""

    centroids: dict[str, np.ndarray]
    raw_centres: dict[str, np.ndarray]
    seconds: dict[str, float]
    history: dict[str, list]
    sample_shape: tuple[int, int]
    sampled_rows: list[int]


@dataclass
class Mapped:
    """Every fit's cluster -> class mapping and the counts it was made from (`count_cluster_classes`)."""

    counted: dict
    counts: dict[str, np.ndarray]  # per fit (k, C) labelled patches, all folds
    mappings: dict[str, np.ndarray]


def run_fit(
    cfg: RunConfig, plan: Plan, extract: Plan, shard_names: list[str], dataset_fingerprint: str
) -> dict[str, FitArtifact]:
    """The fit stage: its inputs, every k fitted, clusters mapped to classes, the fits saved (or reused)."""
    layout = Layout(cfg.output_dir)
    inputs = fit_sources(cfg, plan, extract, shard_names, dataset_fingerprint)
    existing = load_existing_fits(layout.fits, fit_names(cfg), plan, inputs.key)
    if existing:
        log.info("fit: all %d fits exist for these settings and features; reusing them", len(existing))
        return existing
    fitted = fit_every_k(cfg, inputs.sources)
    mapped = map_clusters(cfg, inputs.mapping_set, fitted)
    fits, summary = fit_records(cfg, plan, extract, inputs, fitted, mapped, dataset_fingerprint)
    if cfg.model.compare_backbone:
        summary[BACKBONE_COMPARISON] = backbone_comparison(cfg, layout, inputs.markers, summary[fit_names(cfg)[0]])
    save_fits(layout, plan, inputs.key, fits, summary)
    return fits


def fit_sources(
    cfg: RunConfig, plan: Plan, extract: Plan, shard_names: list[str], dataset_fingerprint: str
) -> FitSources:
    """The complete extract stage's markers and the feature sets to fit and map on, checked."""
    layout = Layout(cfg.output_dir)
    markers = require_complete(layout.features, extract, shard_names, "the fit stage")
    sources, mapping_set = fit_feature_sets(cfg, extract, markers, dataset_fingerprint)
    # the plan is recorded once the fits are made: a fit that failed (no ground truth, k too large)
    # leaves nothing that would refuse the corrected settings
    refuse_conflicts([c] if (c := plan_conflict(layout.fits, plan)) else [])
    return FitSources(markers, sources, mapping_set, fit_inputs(sources, mapping_set))


def fit_every_k(cfg: RunConfig, sources: Sources) -> Fitted:
    """Every fit's centroids from one bounded sample of the sets (then Lloyd passes over every patch, where asked)."""
    refuse_missing_gpus(cfg)
    sample, sampled_rows = gather_union_sample(cfg, sources)
    fitted_on = ", ".join(str(fs.features_dir) for fs, _ in sources)
    if sample.size == 0:
        raise FitError(
            f"no patch features in {fitted_on}: every image failed in extract (reasons in the stage's _done/ "
            "markers and failed_items.json) or the extract stage has not run"
        )
    names = fit_names(cfg)
    fitted, codebooks = Fitted({}, {}, {}, {}, sample.shape, sampled_rows), {}
    try:
        check_features(sample, f"patch features in {fitted_on}")
        log.info("fit: %d sampled patch features of dimension %d", *sample.shape)
        for name in names:
            fit_one(cfg, name, sample, fitted, codebooks)
        if codebooks:
            merge_codebooks(sources, fitted, codebooks)
            fitted.centroids = {name: fitted.centroids[name] for name in names}  # the main fit first, as counted
        if cfg.fit.lloyd_iterations:
            refine_by_lloyd(cfg, sources, fitted, names[:-1])
    except ValueError as err:
        raise FitError(str(err)) from None
    return fitted


def fit_one(cfg: RunConfig, name: str, sample: np.ndarray, fitted: Fitted, codebooks: dict[str, Codebook]) -> None:
    """One fit on the sample: the baseline, a k-means of the sweep, or (fit.method=codebook_merge) a
    sweep fit's codebook, merged into its centroids after the graph pass over every patch."""
    start = time.perf_counter()
    if name != baseline_name(cfg) and cfg.fit.method == "codebook_merge":
        codebooks[name] = fit_codebook(sample, int(name[1:]), cfg.seed, codebook_settings(cfg))
    else:
        fitted.centroids[name], raw = (
            baseline_centroids(cfg, sample) if name == baseline_name(cfg) else fit_centroids(cfg, sample, int(name[1:]))
        )
        if raw is not None:
            fitted.raw_centres[name] = raw
    fitted.seconds[name] = time.perf_counter() - start
    log.info("fit: %s in %.1f s", name, fitted.seconds[name])


def codebook_settings(cfg: RunConfig) -> CodebookMergeSettings:
    f = cfg.fit
    return CodebookMergeSettings(f.codebook_ratio, f.codebook_rows, f.codebook_iterations)


def merge_codebooks(sources: Sources, fitted: Fitted, codebooks: dict[str, Codebook]) -> None:
    """fit.method=codebook_merge: one pass of Ray tasks over every patch of every set builds each
    codebook's boundary graph (exact integer partials, tree-added: the same bytes for any sharding),
    then each is merged into its k clusters on the driver; the pass's time is shared by the fits."""
    start, total = time.perf_counter(), None
    for fs, _ in sources:
        graphs = map_reduce_shards(
            fs.shards(), ["feature"], _shard_graphs, _add_graphs, (codebooks,), desc="fit: codebook graphs"
        )
        total = graphs if total is None else _add_graphs(total, graphs)
    share = (time.perf_counter() - start) / len(codebooks)
    for name, codebook in codebooks.items():
        start = time.perf_counter()
        fitted.centroids[name] = merged_centroids(total[name], int(name[1:]))
        fitted.seconds[name] += share + time.perf_counter() - start
        log.info("fit: %s merged from %d codebook entries", name, len(codebook.centroids))


def _shard_graphs(table, _index: int, codebooks: dict[str, Codebook]) -> dict[str, GraphPartial]:
    features = features_from_table(table)
    return {name: graph_partial(features, codebook) for name, codebook in codebooks.items()}


def _add_graphs(a: dict[str, GraphPartial], b: dict[str, GraphPartial]) -> dict[str, GraphPartial]:
    return {name: add_graph_partials(a[name], b[name]) for name in a}


def refine_by_lloyd(cfg: RunConfig, sources: Sources, fitted: Fitted, names: list[str]) -> None:
    """fit.lloyd_iterations over every patch of every shard, one pass per iteration for every k (the baseline kept)."""
    files = [
        (path, weight) for (fs, _), weight in zip(sources, lloyd_row_weights(sources)) for path in fs.shards().paths
    ]
    refined = distributed_lloyd(
        [path for path, _ in files],
        {name: fitted.centroids[name] for name in names},
        cfg.fit.lloyd_iterations,
        cfg.fit.lloyd_tol,
        row_weights=[w for _, w in files],
        num_gpus=cfg.fit.lloyd_gpus_per_task,
        assign=cfg.fit.lloyd_assign,
    )
    for name, (fitted.centroids[name], fitted.history[name]) in refined.items():
        fitted.seconds[name] += sum(h["seconds"] / h["fits_in_pass"] for h in fitted.history[name])  # its share
        log.info("fit: %s refined by %d Lloyd passes", name, len(fitted.history[name]))


def map_clusters(cfg: RunConfig, mapping_set: FeatureSet, fitted: Fitted) -> Mapped:
    """Every fit's clusters counted against the mapping set's labelled patches (Ray tasks): the
    baseline by Hungarian matching, the others by majority vote."""
    baseline = fit_names(cfg)[-1]
    counted = count_cluster_classes(
        mapping_set.shards(), fitted.centroids, fitted.raw_centres, cfg, co_assign_to=baseline
    )
    counts = {name: c.sum(axis=0) for name, c in counted["mapping_counts"].items()}
    try:
        baseline_mapping = hungarian_mapping(counts[baseline])
        mappings = {name: baseline_mapping if name == baseline else majority_mapping(counts[name]) for name in counts}
    except ValueError as err:
        where = cfg.dataset.root if cfg.fit.mapping_from is None else cfg.fit.mapping_from
        raise FitError(
            f"{err}: the patches that map clusters to classes ({where}) have no ground truth. {MAP_ON_LABELLED}"
        ) from None
    return Mapped(counted, counts, mappings)


def fit_records(
    cfg: RunConfig,
    plan: Plan,
    extract: Plan,
    inputs: FitSources,
    fitted: Fitted,
    mapped: Mapped,
    dataset_fingerprint: str,
) -> tuple[dict[str, FitArtifact], dict]:
    """Every fit as its artifact (centroids, mapping, the arrays the report and label stage use, what
    it was made from) and its fit-summary entry (patch-level scores)."""
    common = fit_provenance(cfg, plan, extract, inputs, fitted, mapped, dataset_fingerprint)
    fits, summary = {}, {}
    for name in fit_names(cfg):
        fits[name] = fit_artifact(cfg, name, fitted, mapped, common)
        summary[name] = summary_entry(cfg, name, fits[name], mapped, common)
    return fits, summary


def summary_entry(cfg: RunConfig, name: str, fit: FitArtifact, mapped: Mapped, common: dict) -> dict:
    """A fit's entry in fit_summary.json: its method, its patch-level scores by mapping protocol, its time."""
    counted = mapped.counted
    patch_level = protocol_scores(
        counted["counts"][name],
        counted["mapping_counts"][name],
        fit.mapping,
        fit.extra_arrays.get("label_free_mapping"),
        CLASS_NAMES,
        protocol_steps(cfg.protocol).patch_miou,
    )
    return {
        "k": fit.k,
        "mapping_kind": fit.mapping_kind,
        "fitted_by": fitted_by(cfg, name),
        "patch_level": patch_level,
        "clusters_without_labelled_patches": int((mapped.counts[name].sum(axis=1) == 0).sum()),
        "fit_seconds": fit.meta["fit_seconds"],
        "fitted_on": common["fitted_on"],
        "mapped_on": common["mapped_on"],
    }


def fit_artifact(cfg: RunConfig, name: str, fitted: Fitted, mapped: Mapped, common: dict) -> FitArtifact:
    """One fit's artifact: its centroids and mapping, the held-out folds' counts, the label-free
    mapping (through the baseline), the main fit's class prototypes, and its meta.json."""
    names, counted = fit_names(cfg), mapped.counted
    baseline = names[-1]
    arrays = {"mapping_counts": counted["mapping_counts"][name]}
    if name != baseline:
        arrays["label_free_mapping"] = label_free_mapping(counted["co_assignment"][name], mapped.mappings[baseline])
    if name == names[0]:
        arrays["class_prototypes"] = main_class_prototypes(
            mapped.mappings[name], counted["main_sums"], counted["main_sizes"]
        )
    meta = {"name": name, "k": len(mapped.mappings[name]), **common, "engine": fit_engine(cfg, name)}
    meta |= {"fit_seconds": round(fitted.seconds[name], 3), "lloyd_history": fitted.history.get(name, [])}
    return FitArtifact(
        centroids=fitted.centroids[name],
        mapping=mapped.mappings[name],
        extra_arrays=arrays,
        mapping_kind="hungarian" if name == baseline else "majority",
        meta=meta,
    )


def fit_provenance(
    cfg: RunConfig,
    plan: Plan,
    extract: Plan,
    inputs: FitSources,
    fitted: Fitted,
    mapped: Mapped,
    dataset_fingerprint: str,
) -> dict:
    """What every fit records it was made from and how (its meta.json): plan, model, sets, engine, sample."""
    fitted_records = [
        fs.record() | {"weight": s.weight, "max_samples": s.max_samples, "sampled_rows": n}
        for (fs, s), n in zip(inputs.sources, fitted.sampled_rows)
    ]
    mapped_record = inputs.mapping_set.record() | {"labelled_patches": int(mapped.counts[fit_names(cfg)[-1]].sum())}
    return {
        "plan_key": plan.key,
        "inputs": inputs.key,
        "model_identity": extract.settings["model"],
        "feature_kind": cfg.model.feature_kind,
        "feature_dim": int(fitted.sample_shape[1]),
        "model": extracted_model(inputs.markers),
        "dataset_fingerprint": dataset_fingerprint,
        "seed": cfg.seed,
        "engine": fit_engine(cfg),
        "protocol": cfg.protocol,
        "n_samples": int(fitted.sample_shape[0]),
        "fitted_on": fitted_records,
        "mapped_on": mapped_record,
    }


def main_class_prototypes(mapping: np.ndarray, cluster_sums: np.ndarray, cluster_sizes: np.ndarray) -> np.ndarray:
    """Prototype denoising's class prototypes: the main fit's clusters' patches pooled by mapped class."""
    class_sums = np.zeros((NUM_CLASSES, cluster_sums.shape[1]))
    np.add.at(class_sums, mapping, cluster_sums)
    sizes = np.bincount(mapping, cluster_sizes, NUM_CLASSES)
    return class_prototypes(class_sums, sizes).astype(np.float32)


def backbone_comparison(cfg: RunConfig, layout: Layout, markers: dict[str, dict], head: dict) -> dict:
    """The raw backbone's patch features fitted as the main fit was (same k, engine or the paper's
    MiniBatchKMeans, same sample rule), mapped by majority, scored at patch level beside it."""
    shards = FeatureShards(layout.features, markers, path_of=backbone_path)
    sample = gather_sample(shards, cfg)
    check_features(sample, f"backbone patch features in {layout.features / '_backbone'}")
    name = f"backbone_k{cfg.fit.k}"
    start = time.perf_counter()
    centroids, raw = fit_centroids(cfg, sample, cfg.fit.k)
    seconds = time.perf_counter() - start
    counted = count_cluster_classes(shards, {name: centroids}, {name: raw} if raw is not None else {}, cfg)
    fold_counts, fold_mapping_counts = counted["counts"], counted["mapping_counts"]
    if not fold_mapping_counts[name].any():  # the head's fits may be mapped on another set (fit.mapping_from)
        raise FitError(
            f"model.compare_backbone scores the backbone's features on this run's labelled patches, and "
            f"{layout.features} has none (no ground truth): set model.compare_backbone=false"
        )
    mapping = majority_mapping(fold_mapping_counts[name].sum(axis=0))
    log.info("fit: %s on %d backbone patch features of dimension %d in %.1f s", name, *sample.shape, seconds)
    return {
        "k": cfg.fit.k,
        "engine": fit_engine(cfg),
        "n_samples": int(sample.shape[0]),
        "head": {"feature_dim": HEAD_FEATURE_DIM, "patch_level": head["patch_level"]},
        "backbone": {
            "feature_dim": int(sample.shape[1]),
            "fit_seconds": round(seconds, 3),
            "patch_level": protocol_scores(
                fold_counts[name],
                fold_mapping_counts[name],
                mapping,
                None,
                CLASS_NAMES,
                protocol_steps(cfg.protocol).patch_miou,
            ),
        },
    }
