"""Times one label pass per image, outside Ray, in whichever checkout it runs in (this one, or an
older one that `bench_label.py` checks out to compare): extract and fit with that checkout's
pipeline, then the label step (and, where the checkout has one, the score step) on each image,
CPU seconds of one thread. Prints one JSON line: {setting: seconds per image}.

    python label_pass_driver.py CONFIG RUN_DIR IMAGES BASE_JSON SETTINGS_JSON
BASE_JSON: [overrides...] for every setting (the data, a model that runs here); SETTINGS_JSON:
{"default": [overrides...], "everything": [...]}; overrides a checkout's schema does not know are
left out (an older checkout scores everything anyway).
"""

import inspect
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from configs.schema import ConfigError, load_config

    config, run_dir, images = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    base, settings = [f"output_dir={run_dir}", *json.loads(sys.argv[4])], json.loads(sys.argv[5])
    from ray_jobs.pipeline import Pipeline

    cfg = load_config(config, base)
    Pipeline(cfg).run(("extract", "fit"))
    torch.set_num_threads(1)
    out = {}
    for name, overrides in settings.items():
        known = []
        for item in overrides:
            try:
                load_config(config, base + known + [item])
                known.append(item)
            except ConfigError:
                pass  # a key this checkout does not have
        out[name] = {"seconds_per_image": label_seconds(load_config(config, base + known), images), "overrides": known}
    print("RESULT " + json.dumps(out))


def label_seconds(cfg, images: int) -> float:
    """Mean CPU seconds per image of the label step (+ the score step), over `images` images after one warm-up.
    Written against both layouts: this checkout's and the one before the split (its module paths and its
    one actor that labelled and scored)."""
    from actors.feature_reader import image_features
    from actors.label import LabelImages
    from storage.datasets import list_dataset

    try:
        from core.clustering.fit_artifact import FitArtifact
        from storage.run.fits import fit_names, fit_pixel_stride
        from storage.run.shards import plan_shards
    except ImportError:  # the layout before the split
        from core.fit_artifact import FitArtifact
        from ray_jobs.fit import fit_names
        from storage.shards import plan_shards

        def fit_pixel_stride(cfg, name):
            return cfg.label.sweep_pixel_stride if name in fit_names(cfg)[1:-1] else 1

    fits = []
    for name in fit_names(cfg):
        art = FitArtifact.load(cfg.output_dir / "fits" / name)
        fits.append(
            {
                "name": name,
                "centroids": art.centroids,
                "mapping": art.mapping,
                "stride": fit_pixel_stride(cfg, name),
                "prototypes": art.extra_arrays.get("class_prototypes"),
            }
        )
    records = list_dataset(cfg.dataset.kind, cfg.dataset.root, cfg.dataset.split, cfg.dataset.max_images)
    takes_dict = "config" in inspect.signature(image_features).parameters  # before configs were passed parsed
    config, rows = cfg.model_dump(mode="json") if takes_dict else cfg, []
    for shard in plan_shards(records, cfg.dataset.images_per_shard):
        rows += list(image_features(shard, config, str(cfg.output_dir / "features")))
    tmp = Path(tempfile.mkdtemp())
    if "stage_dir" in inspect.signature(LabelImages).parameters:  # before the score step: one actor labels and scores
        actor = LabelImages(config, fits, str(tmp / "scores"), str(tmp / "labels"), [], "bench")

        def one(row):
            return [actor(row)]
    else:
        from actors.score import score_image
        from configs.specs import evaluation_spec
        from core.labelling.image import label_fits

        actor, spec = LabelImages(config, fits, str(tmp / "labels"), []), evaluation_spec(cfg, label_fits(fits))
        actor.setup()

        def one(row):
            labelled = actor(row)
            return [
                labelled,
                score_image(labelled, spec, str(tmp / "scores"), "bench", str(tmp / "labels"), cfg.dataset.split),
            ]

    one(rows[0])  # warms up (first calls compile and cache)
    start = time.process_time()
    for row in rows[1 : images + 1]:
        for status in one(row):
            assert not status["error"], status["error"]
    return (time.process_time() - start) / min(images, len(rows) - 1)


if __name__ == "__main__":
    main()
