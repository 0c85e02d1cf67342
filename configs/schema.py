"""The one schema every YAML config is validated against.

Defaults live here, not in the code that reads them. Unknown keys and bad values are rejected
with a message that names the key, the value and what is allowed.
"""

import logging
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import UserError
from storage.run.placement import refuse_output_in_input

log = logging.getLogger(__name__)
# Old spellings still read, each with a message: "seed" named the paper's protocol and evaluator, and the
# main fit's unrefined labels; it now names random seeds only.
RENAMED = {
    "protocol": {"seed": "paper"},
    "report.evaluators": {"seed": "paper"},
    "refine.write_variant": {"seed": "plain"},
}


def renamed(key: str, value):
    """`value` of `key` in its current spelling (a list item by item), with a deprecation message for an old one."""
    if isinstance(value, list):
        return [renamed(key, v) for v in value]
    new = RENAMED[key].get(value) if isinstance(value, str) else None
    if new is None:
        return value
    log.warning("%s: %r is deprecated and now called %r; it is read as %r (change your config)", key, value, new, new)
    return new


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(Strict):
    kind: Literal["cityscapes", "folder"] = "cityscapes"
    root: str = "data/demo_cityscapes"  # a local folder, or for kind=folder also an object-store URI (s3://...)
    split: str = "val"
    max_images: int | None = Field(default=None, ge=1)
    images_per_shard: int = Field(default=16, ge=1)
    # Every image is checked from its header before it is decoded; a larger or more elongated one
    # is a failed item naming the limit. 100 Mpx (300 MB decoded) passes any camera frame (a
    # Cityscapes frame is 2.1 Mpx, an 8000x8000 one 64 Mpx) and stays below PIL's own refusal of
    # decompression bombs (2 x Image.MAX_IMAGE_PIXELS = 179 Mpx), which follows this limit.
    max_image_pixels: int = Field(default=100_000_000, ge=1)
    # long side / short side: 16 passes panoramas (a 360-degree one is 2:1) and refuses a strip such
    # as 1x100000 px, which the short-side resize would cut into hundreds of thousands of windows.
    max_aspect_ratio: float = Field(default=16.0, ge=1, allow_inf_nan=False)


class DemoSetConfig(Strict):
    """The generated Cityscapes-format demo set (`submit.py synth`, and `run` when it is missing)."""

    generate_if_missing: bool = True
    num_images: int = Field(default=100, ge=1)
    height: int = Field(default=256, ge=64)
    width: int = Field(default=512, ge=64)
    seed: int = 0


class ViTConfig(Strict):
    patch_size: int = Field(default=14, ge=1)
    embed_dim: int = Field(default=768, ge=8)
    depth: int = Field(default=12, ge=1)
    num_heads: int = Field(default=12, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    img_size: int = Field(default=518, ge=14)
    init_values: float = Field(default=1e-5, gt=0)

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.vit.embed_dim={self.embed_dim} must be divisible by model.vit.num_heads={self.num_heads}"
            )
        return self


class ModelConfig(Strict):
    """Backbone (+ CAUSE head). With no checkpoint the ViT is randomly initialised: demo only."""

    vit: ViTConfig = ViTConfig()
    feature_kind: Literal["backbone", "head"] = "backbone"
    init_seed: int = 0
    cause_root: Path | None = None  # fills the checkpoint paths below from the CAUSE layout
    backbone_checkpoint: Path | None = None
    head_checkpoint: Path | None = None
    codebook_path: Path | None = None
    cluster_probe_checkpoint: Path | None = None
    # With feature_kind=head: also extract the raw DINOv2 tokens (base scale), fit them with the same
    # k and settings, and compare both at patch level in one table (the paper's "DINOv2 raw k=300" row).
    compare_backbone: bool = False

    @model_validator(mode="after")
    def _backbone_beside_head(self):
        if self.compare_backbone and self.feature_kind != "head":
            raise ValueError(
                "model.compare_backbone=true compares the head's features with the backbone's, but "
                "model.feature_kind='backbone' already fits the backbone: set model.feature_kind=head"
            )
        return self


class InferenceConfig(Strict):
    """Dense features: resize the short side, slide a square window, average overlaps and flips."""

    short_side: int = Field(default=322, ge=14)
    crop: int = Field(default=322, ge=14)
    stride: int = Field(default=161, ge=1)
    flip: bool = True
    # protocol=paper labels the fits at 1.0 and uses the scales for the baseline's multi-scale rows (its scheme)
    scales: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(default=[1.0], min_length=1)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp16/bf16 autocast applies on GPU only
    batch_size: int = Field(default=8, ge=1)  # windows per forward pass
    # The windows one image is cut into, over every scale (and the protocol's extra views): an image
    # cut into more is a failed item naming this key. Each window is crop^2 x 3 bytes in and
    # (feature dim x (crop / patch)^2) floats out (1.6 MB at 768-d, 322 px). 512 passes a Cityscapes
    # frame at the 7 scales 0.5..2.0 (74 windows at 322 px) and any image within
    # dataset.max_aspect_ratio at scale 1.0 (31); settings that exceed it for every image are refused.
    max_windows_per_image: int = Field(default=512, ge=1)

    @model_validator(mode="after")
    def _stride_within_crop(self):
        if self.stride > self.crop:
            raise ValueError(
                f"inference.stride={self.stride} is larger than inference.crop={self.crop}: windows would leave gaps"
            )
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(
                f"inference.scales={self.scales} lists a scale twice: each would be extracted and averaged twice"
            )
        return self


class WorkersConfig(Strict):
    """An actor pool. Leave CPU for Ray Data's tasks: num_actors * cpus_per_actor < cores."""

    num_actors: int = Field(default=1, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)  # > 0 puts the model (or the assignment) on CUDA


class ModelPoolConfig(WorkersConfig):
    """The actors that run only the model, on the windows of `batch_images` images at a time."""

    batch_images: int = Field(default=8, ge=1)


class TaskConfig(Strict):
    """Ray Data tasks of one CPU step (decode, stitch, write): what each reserves and how many run at once."""

    num_cpus: float = Field(default=0.5, gt=0)
    concurrency: int | None = Field(default=None, ge=1)  # None: as many as the free CPUs allow


class ExtractConfig(Strict):
    """extract (and apply): CPU tasks read, decode, resize and cut windows -> a model-only actor
    pool -> CPU tasks stitch windows, compute patch labels and write. Ray Data streams the images
    through the three and bounds the memory in between (backpressure)."""

    read: TaskConfig = TaskConfig()
    model: ModelPoolConfig = ModelPoolConfig()
    write: TaskConfig = TaskConfig()


class FeatureSourceConfig(Strict):
    """One feature set the centroids are fitted on (fit.features)."""

    # A run's output_dir or its features/ folder, written by `submit.py extract` or by `submit.py
    # apply --set apply.write_features=true` (with this run's model settings); None: this run's own.
    path: str | None = None
    # Its share of the fit: of the fit.max_samples sampled rows, at most weight / (sum of weights)
    # come from it (a set with fewer sampled rows than that is taken whole, so the weight then makes
    # no difference to the sampled fit); in fit.lloyd_iterations its rows weigh that share of the
    # total, whatever its size. max_samples caps its sampled rows.
    weight: float = Field(default=1.0, gt=0, le=1e6, allow_inf_nan=False)
    max_samples: int | None = Field(default=None, ge=1)


class FitConfig(Strict):
    k: int = Field(default=300, ge=2)
    # How each k of the sweep is fitted (the baseline is always k-means or CAUSE's probe):
    # "kmeans": spherical k-means (fit.engine) on the bounded sample; "codebook_merge": a codebook of
    # codebook_ratio x k k-means entries merged into k clusters along its density bridges, which gives
    # rare classes clusters of their own where k-means spends them on mass (core/clustering/codebook_merge.py;
    # bench/README.md measures both: it wins where concepts have density gaps between them, and loses
    # 1-15 points of held-out mIoU on the demo's continuum). It adds one pass of Ray tasks over every
    # patch for the whole sweep.
    method: Literal["kmeans", "codebook_merge"] = "kmeans"
    codebook_ratio: int = Field(default=10, ge=2)  # codebook entries per cluster
    codebook_rows: int = Field(default=25, ge=1)  # sample rows per entry the codebook is fitted on
    codebook_iterations: int = Field(default=8, ge=1)  # the codebook's k-means iterations
    k_sweep: list[int] = [19, 50, 100, 200, 300]
    baseline: Literal["kmeans_hungarian", "cluster_probe"] = "kmeans_hungarian"
    engine: Literal["faiss", "sklearn"] = "faiss"
    n_iter: int = Field(default=50, ge=1)
    max_patches_per_image: int = Field(default=400, ge=1)
    max_samples: int = Field(default=2_000_000, ge=1)
    max_points_per_centroid: int = Field(default=256, ge=1)  # faiss Lloyd runs on at most k x this many sampled rows
    # Lloyd iterations over every patch of every shard (Ray tasks, tree-reduced), warm-started
    # from the sampled fit; 0 keeps the sampled fit. Stops early when inertia changes less than lloyd_tol.
    lloyd_iterations: int = Field(default=0, ge=0)
    lloyd_tol: float = Field(default=1e-4, ge=0)
    # The assignment step of those iterations: numpy BLAS, torch matmuls or a faiss flat index, on
    # the GPU when each row-group task reserves lloyd_gpus_per_task > 0 (torch, or a faiss with CUDA).
    lloyd_assign: Literal["numpy", "torch", "faiss"] = "numpy"
    lloyd_gpus_per_task: float = Field(default=0.0, ge=0, le=1)
    # Held-out mapping protocol: images split into this many folds by a hash of their id; each
    # fold is scored with a mapping made from the other folds only. 1 turns the protocol off.
    heldout_folds: int = Field(default=5, ge=1)
    # What the centroids are fitted on: one or more feature sets (their union, by weight); the
    # default is this run's own features. A large unlabelled set's features go here.
    features: list[FeatureSourceConfig] = Field(default_factory=lambda: [FeatureSourceConfig()], min_length=1)
    # The labelled feature set whose patches map clusters to classes (a run's output_dir or its
    # features/); None: this run's own. Its images are not this run's, so fit.heldout_folds must be 1.
    mapping_from: str | None = None

    @model_validator(mode="after")
    def _sweep_values(self):
        bad = [k for k in self.k_sweep if k < 2]
        if bad:
            raise ValueError(f"fit.k_sweep has values < 2: {bad}")
        if self.lloyd_gpus_per_task > 0 and self.lloyd_assign == "numpy":
            raise ValueError(
                "fit.lloyd_assign=numpy runs on the CPU: set fit.lloyd_assign=torch (or faiss, with a CUDA "
                "build) to use fit.lloyd_gpus_per_task, or set it to 0"
            )
        paths = [source.path for source in self.features]
        if len(set(paths)) < len(paths):
            raise ValueError(f"fit.features names a feature set twice ({paths}): list each once, with its weight")
        largest = max([self.k, *self.k_sweep])
        if self.method == "codebook_merge" and self.codebook_ratio * largest > self.max_samples:
            raise ValueError(
                f"fit.codebook_ratio={self.codebook_ratio}: the codebook of the largest fit (k={largest}) would "
                f"have {self.codebook_ratio * largest} entries, more than the fit's sample of at most "
                f"fit.max_samples={self.max_samples} rows: lower fit.codebook_ratio or raise fit.max_samples"
            )
        if self.method == "codebook_merge" and self.lloyd_iterations:
            raise ValueError(
                "fit.lloyd_iterations moves each centroid to the mean of its nearest rows, which undoes the "
                "merged clusters of fit.method=codebook_merge: set fit.lloyd_iterations=0 with it"
            )
        if self.mapping_from is not None and self.heldout_folds != 1:
            raise ValueError(
                f"fit.mapping_from={self.mapping_from!r} maps on another image set than this run's, so this "
                f"run's images are held out from the mapping already: set fit.heldout_folds=1 (got "
                f"{self.heldout_folds})"
            )
        return self

    @property
    def own_features_only(self) -> bool:
        """Fitted and mapped on this run's features alone (the default)."""
        return [source.path for source in self.features] == [None] and self.mapping_from is None


class LabelConfig(Strict):
    """label: CPU tasks read the features extract wrote (no model) -> an actor pool labels and
    scores every image (on CPU, or the assignment on CUDA with workers.gpus_per_actor > 0)."""

    write_label_pngs: bool = True
    num_overlays: int = Field(default=8, ge=0)  # coloured overlays written for the first N images
    # The k sweep's extra fits are scored on every s-th pixel in each direction (the main fit and the
    # baseline always on every pixel): their full-resolution labels are never written or read.
    sweep_pixel_stride: int = Field(default=1, ge=1)
    # A person's mapping of the main fit's clusters (mapping.json from the cluster atlas): the written
    # pseudo-labels use it, and the report scores it as the "human" protocol.
    human_mapping: str | None = None
    read: TaskConfig = TaskConfig(num_cpus=0.25)
    workers: WorkersConfig = WorkersConfig()
    # the scoring step beside the labelling actors: CPU tasks that run the evaluators (report.evaluators)
    score: TaskConfig = TaskConfig(num_cpus=0.25)


class PanopticConfig(Strict):
    """Panoptic segments from the pseudo-labels: stuff per class, things by connected components."""

    thing_min_area: int = Field(default=64, ge=1)  # pixels; smaller components become void
    stuff_min_area: int = Field(default=64, ge=1)
    connectivity: Literal[4, 8] = 8


class RefineConfig(Strict):
    """Optional refinements of the main fit's labels, each scored beside the plain labels.

    crf: dense CRF on the class logits (CAUSE's parameters). em_semantic: CLUSTSEG EM adapts the
    global centroids to each image (mapping kept). em_things: EM splits thing regions into
    instances instead of connected components. superpixels: EM superpixels over (feature, colour,
    position) from grid seeds; each takes its majority label.
    """

    crf: bool = False
    em_semantic: bool = False
    em_things: bool = False
    superpixels: bool = False
    # the paper's feature-space heuristics, which it reports as harmful (core/refine/paper_heuristics.py)
    prototype_denoising: bool = False
    knn_diffusion: bool = False
    tau: float = Field(default=0.05, gt=0)
    iterations: int = Field(default=3, ge=0)
    superpixel_step: int = Field(default=16, ge=2)
    _old_variant = field_validator("write_variant", mode="before")(lambda v: renamed("refine.write_variant", v))
    write_variant: Literal[
        "plain", "crf", "em_semantic", "em_things", "superpixels", "prototype_denoising", "knn_diffusion"
    ] = "plain"

    @model_validator(mode="after")
    def _written_variant_is_enabled(self):
        if self.write_variant != "plain" and not getattr(self, self.write_variant):
            raise ValueError(
                f"refine.write_variant={self.write_variant!r} but refine.{self.write_variant} is false: enable it"
            )
        return self


class ReportConfig(Strict):
    # What scores the labels (core/evaluation): "official" (cityscapesscripts' rules; the k sweep and
    # every mapping protocol are its counts, so it is always one of them), "paper" (the paper's
    # evaluate_cascade_pseudolabels.py) and "cause" (CAUSE's centre crop, protocol=cause only).
    # None: the protocol's own (official: official; paper: official + paper; cause: official + cause).
    evaluators: list[Literal["official", "paper", "cause"]] | None = Field(default=None, min_length=1)
    _old_evaluators = field_validator("evaluators", mode="before")(lambda v: renamed("report.evaluators", v))
    # The protocol sensitivity table: every fit labelled both ways (full size, resized) and scored by
    # the official and the paper's evaluator, and the baseline's labels made in more ways. It labels and
    # scores every image several times over, so it is off unless asked for.
    sensitivity: bool = False
    # The few-shot mapping protocol: each cluster takes the majority class of m labelled patches
    # drawn from the other folds, for every m here, averaged over few_shot_draws seeded draws.
    few_shot: list[int] = [1, 3, 9, 27]
    few_shot_draws: int = Field(default=10, ge=1)

    @model_validator(mode="after")
    def _shots(self):
        if any(m < 1 for m in self.few_shot) or len(set(self.few_shot)) < len(self.few_shot):
            raise ValueError(f"report.few_shot={self.few_shot}: each m must be >= 1 and listed once")
        if self.evaluators is not None and (
            len(set(self.evaluators)) < len(self.evaluators) or "official" not in self.evaluators
        ):
            raise ValueError(
                f"report.evaluators={self.evaluators}: list each evaluator once, official among them (the k "
                "sweep and every mapping protocol are its counts)"
            )
        return self


class AtlasConfig(Strict):
    # `submit.py run` writes the main fit's cluster atlas (output_dir/atlas) after the report
    enabled: bool = True


class ApplyConfig(Strict):
    write_features: bool = False  # also write the images' patch features (extract's schema) to output_dir/features
    # apply runs the model pool and the labelling pool at once (extract and label run one after the
    # other): the actors of each while it does; None keeps extract.model / label.workers.num_actors.
    model_actors: int | None = Field(default=None, ge=1)
    label_actors: int | None = Field(default=None, ge=1)


class RayConfig(Strict):
    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else a local cluster
    local_num_cpus: int | None = Field(default=None, ge=1)
    # Refuse, before a stage starts, steps that the cluster's nodes cannot host (a hang otherwise).
    # Set false on an autoscaling cluster whose nodes join once the job asks for them.
    check_resources: bool = True


PROTOCOL_EVALUATORS = {"official": ("official",), "paper": ("official", "paper"), "cause": ("official", "cause")}


class RunConfig(Strict):
    run_name: str = "run"
    output_dir: Path = Path("outputs/run")
    seed: int = 0
    # Which variant of each step around the model (core/presets.py): "official" (full resolution,
    # cityscapesscripts rules), "paper" (every step as the paper's scripts do it; "seed" is its old name) or "cause"
    # (official, plus the baseline under CAUSE's test protocol: 322 centre crop, 27 classes).
    protocol: Literal["official", "paper", "cause"] = "official"
    _old_protocol = field_validator("protocol", mode="before")(lambda v: renamed("protocol", v))
    dataset: DatasetConfig = DatasetConfig()
    demo_set: DemoSetConfig | None = None
    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    extract: ExtractConfig = ExtractConfig()
    label: LabelConfig = LabelConfig()
    panoptic: PanopticConfig = PanopticConfig()
    refine: RefineConfig = RefineConfig()
    fit: FitConfig = FitConfig()
    apply: ApplyConfig = ApplyConfig()
    report: ReportConfig = ReportConfig()
    atlas: AtlasConfig = AtlasConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if str(self.output_dir) in ("", "."):
            raise ValueError("output_dir must name a folder of its own (e.g. outputs/run), not the current folder")
        refuse_output_in_input(self.output_dir, "output_dir", {"dataset.root": self.dataset.root})
        refuse_output_in_input(
            self.output_dir,
            "output_dir",
            {
                "fit.mapping_from": self.fit.mapping_from,
                **{f"fit.features[{i}].path": source.path for i, source in enumerate(self.fit.features)},
            },
            fix="This run's own features need no path (leave it null); another run's folder goes beside output_dir",
        )
        if self.model.feature_kind == "head" and self.inference.crop != 322:
            raise ValueError(
                f"inference.crop={self.inference.crop} but model.feature_kind='head' needs 322: "
                "the Segment_TR head's query_pos is a 23x23 grid of 14 px patches"
            )
        if self.inference.crop % self.model.vit.patch_size:
            raise ValueError(
                f"inference.crop={self.inference.crop} must be a multiple of "
                f"model.vit.patch_size={self.model.vit.patch_size}"
            )
        if self.protocol == "paper" and self.inference.short_side != self.inference.crop:
            raise ValueError(
                f"protocol=paper resizes the short side to its window size, but inference.short_side="
                f"{self.inference.short_side} and inference.crop={self.inference.crop}: set them equal (322)"
            )
        if self.protocol == "paper" and (self.inference.stride != self.inference.crop // 2 or not self.inference.flip):
            raise ValueError(
                f"protocol=paper slides its windows at half their size and flip-averages them, but inference.stride="
                f"{self.inference.stride} and inference.flip={self.inference.flip}: set inference.stride="
                f"{self.inference.crop // 2} and inference.flip=true"
            )
        if self.protocol == "cause" and self.inference.crop > self.inference.short_side:
            raise ValueError(
                f"protocol=cause centre-crops inference.crop={self.inference.crop} px from the image resized to "
                f"inference.short_side={self.inference.short_side}: the crop must not exceed the short side"
            )
        if self.model.compare_backbone and not self.fit.own_features_only:
            raise ValueError(
                "model.compare_backbone fits this run's own backbone features beside the main fit: leave "
                "fit.features and fit.mapping_from unset with it"
            )
        if self.protocol == "paper" and not self.fit.own_features_only:
            raise ValueError(
                "protocol=paper fits and maps on the labelled patches of this run's images, as the paper's scripts "
                "do: leave fit.features and fit.mapping_from unset, or use protocol=official"
            )
        if self.fit.method == "codebook_merge" and self.protocol == "paper":
            raise ValueError(
                "protocol=paper fits the paper's MiniBatchKMeans; fit.method=codebook_merge is this tool's "
                "fit: set fit.method=kmeans with protocol=paper, or use protocol=official"
            )
        if self.protocol == "paper" and self.fit.lloyd_iterations:
            raise ValueError(
                "protocol=paper fits the paper's MiniBatchKMeans; fit.lloyd_iterations refines the official fit: "
                "set fit.lloyd_iterations=0 with protocol=paper"
            )
        if "cause" in (self.report.evaluators or ()) and self.protocol != "cause":
            raise ValueError(
                f"report.evaluators names cause, but CAUSE's centre crop is extracted only under protocol=cause "
                f"(this run: {self.protocol}): set protocol=cause or leave cause out"
            )
        if (
            self.fit.baseline == "cluster_probe"
            and self.model.cluster_probe_checkpoint is None
            and self.model.cause_root is None
        ):
            raise ValueError("fit.baseline='cluster_probe' needs model.cluster_probe_checkpoint or model.cause_root")
        if self.fit.baseline == "cluster_probe" and self.model.feature_kind != "head":
            raise ValueError(
                "fit.baseline='cluster_probe' compares with CAUSE's 27 probe centroids of 90-d head features: "
                "set model.feature_kind=head, or fit.baseline=kmeans_hungarian for backbone features"
            )
        return self

    @property
    def evaluators(self) -> tuple[str, ...]:
        """The evaluators the run scores with: report.evaluators, else its protocol's own."""
        return tuple(self.report.evaluators or PROTOCOL_EVALUATORS[self.protocol])

    @property
    def all_k(self) -> list[int]:
        """Every k to fit, the main k included, ascending and unique."""
        return sorted(set(self.fit.k_sweep) | {self.fit.k})


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (check its spelling; see configs/schema.py for the allowed keys)")
        elif not e["loc"]:  # a check across sections: its message names the keys, the input is the whole config
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_config(data: dict, source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}: {_format_errors(err)}") from None


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (yaml.safe_load), apply `key.sub=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the configs/ folder has examples, e.g. configs/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a text file: give a YAML config (e.g. configs/demo.yaml)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config {path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err}); "
                "quote it, e.g. --set 'key=\"text\"'"
            ) from None
    return parse_config(data, str(path))


def recorded_dataset_root(run_dir: Path | str) -> str | None:
    """The dataset.root a run recorded (absolute) in its config.yaml, or None where there is no
    readable record: what an output of a later command must keep out of."""
    try:
        root = (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("dataset", {}).get("root")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return root if isinstance(root, str) else None


def recorded_config(cfg: RunConfig) -> dict:
    """The config as a run records it (`<output_dir>/config.yaml`): every local path made absolute,
    so the record describes the run from any working directory (`submit.py atlas` reads it)."""
    data = cfg.model_dump(mode="json")

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).resolve())

    data["output_dir"] = absolute(data["output_dir"])
    data["dataset"]["root"] = absolute(data["dataset"]["root"])
    for key in ("cause_root", "backbone_checkpoint", "head_checkpoint", "codebook_path", "cluster_probe_checkpoint"):
        data["model"][key] = absolute(data["model"][key])
    data["label"]["human_mapping"] = absolute(data["label"]["human_mapping"])
    data["fit"]["mapping_from"] = absolute(data["fit"]["mapping_from"])
    for source in data["fit"]["features"]:
        source["path"] = absolute(source["path"])
    return data
