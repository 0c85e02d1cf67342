"""The one entry point, locally and under `ray job submit`.

    python submit.py run --config configs/demo.yaml          # every stage
    python submit.py extract|fit|label|report --config ...   # one stage, resuming from output_dir
    python submit.py synth --root data/demo_cityscapes       # only write the demo set
    python submit.py apply --config ... --fit outputs/demo/fits/k200 \
        --set dataset.kind=folder --set dataset.root=s3://bucket/frames --set output_dir=outputs/frames
                                                             # label unlabelled images with a saved fit
    python submit.py run --config ... --set fit.k=200        # override any config key
    python submit.py compare outputs/head outputs/backbone --out compare.md   # k sweeps side by side
    python submit.py atlas --fit outputs/demo/fits/k300 [--out DIR]            # the cluster atlas of a fit
    python submit.py import-fit kmeans_centroids.npz --run outputs/demo --name seed_k300
                                                             # another tool's centres + cluster_to_class as a fit
                                                             # of a run; then `label`/`run` label and score it
"""

import argparse
import logging
import sys
from pathlib import Path

from configs.schema import load_config
from storage.run.placement import refuse_a_moved_runs_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "extract", "fit", "label", "report"):
        p = sub.add_parser(name, help=f"run {'every stage' if name == 'run' else 'the ' + name + ' stage'}")
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set fit.k=200 (repeatable)",
        )
    compare = sub.add_parser(
        "compare", help="put the k sweeps of finished runs side by side (e.g. head vs backbone features)"
    )
    compare.add_argument("runs", type=Path, nargs="+", help="output_dir of each run (holding report.json)")
    compare.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    apply = sub.add_parser("apply", help="label a folder or object-store URI of unlabelled images with a saved fit")
    apply.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    apply.add_argument("--fit", type=Path, required=True, help="a fit folder, e.g. outputs/demo/fits/k200")
    apply.add_argument(
        "--mapping", type=Path, help="a person's cluster -> class mapping.json for that fit (cluster atlas)"
    )
    apply.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    atlas = sub.add_parser(
        "atlas", help="write the cluster atlas of a fit: a static page to look at and name every cluster"
    )
    atlas.add_argument("--fit", type=Path, required=True, help="a fit folder of a run, e.g. outputs/demo/fits/k300")
    atlas.add_argument(
        "--out", type=Path, default=None, help="default <run>/atlas for the main fit, <run>/atlas_<fit> for others"
    )
    atlas.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    imported = sub.add_parser(
        "import-fit",
        help="write another tool's k-means centres and cluster -> class mapping "
        "(an .npz, e.g. the paper's kmeans_centroids.npz) as a fit of a run",
    )
    imported.add_argument("source", type=Path, help="the .npz: (k, D) float centres and (k,) integer trainIds")
    imported.add_argument("--run", type=Path, required=True, help="the run's output_dir (extract and fit done)")
    imported.add_argument("--name", required=True, help="the fit's name, its folder in <run>/fits/, e.g. seed_k300")
    imported.add_argument(
        "--centroids-key", default="centroids", help="the centres' array in the .npz (default: the paper's)"
    )
    imported.add_argument(
        "--mapping-key", default="cluster_to_class", help="the mapping's array (default: the paper's)"
    )
    synth = sub.add_parser("synth", help="write the generated Cityscapes-format demo set")
    synth.add_argument(
        "--root", type=Path, default=None, help="default data/demo_cityscapes (data/demo_unlabelled with --unlabelled)"
    )
    synth.add_argument("--split", default="val")
    synth.add_argument("--num-images", type=positive_int, default=100)
    synth.add_argument("--height", type=positive_int, default=256)
    synth.add_argument("--width", type=positive_int, default=512)
    synth.add_argument("--seed", type=int, default=None, help="default 0 (1 with --unlabelled)")
    synth.add_argument(
        "--unlabelled",
        action="store_true",
        help="write a folder of unlabelled frames instead (other seeds and camera colours, no ground truth; "
        "dataset.kind: folder)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from core.errors import UserError

    try:
        return COMMANDS.get(args.command, run_stages)(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:  # a path that cannot be read or written: the user's to fix, not a bug
        print(f"error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C: what was kept and how to go on, not a traceback
        _disconnect_quietly()
        print(f"interrupted: {interrupted_note(args)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    return 2


def _disconnect_quietly() -> None:
    """Leave Ray before the local cluster's workers are ended: a SIGINT to the driver alone (`kill
    -INT`, `timeout`) otherwise streams each dying worker's abort trace after the one line."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        ray.shutdown()
    except KeyboardInterrupt:  # a second Ctrl-C: leave the rest to the interpreter's exit
        pass


def interrupted_note(args) -> str:
    """What an interrupted command leaves behind, and how to go on."""
    if args.command == "compare":
        return f"{args.out} is written whole or not at all; run the same command again"
    if args.command == "synth":
        return "the demo set may be partly written; run the same command again to write it whole"
    if args.command == "atlas":
        return "the atlas may be partly written (its page comes last); run the same command again"
    try:
        where = load_config(args.config, args.overrides).output_dir
    except Exception:  # noqa: BLE001 - interrupted while the config was read: say it in words
        where = "the config's output_dir"
    return f"finished shards and images are kept in {where}; run the same command again to resume"


def compare(args) -> int:
    import json

    from configs.schema import recorded_dataset_root
    from core.errors import UserError
    from core.reporting.markdown import render_comparison
    from storage.run.atomic import write_text_atomic
    from storage.run.placement import refuse_output_in_input

    reports = {}
    for run in args.runs:  # nor into the datasets the runs describe: a folder dataset takes any .png or .jpg
        refuse_output_in_input(
            args.out,
            "--out",
            {"a compared run": run, f"{run / 'config.yaml'}'s dataset.root": recorded_dataset_root(run)},
        )
        path = run / "report.json"
        try:
            reports[str(run)] = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no report at {path}: run the job (or its report stage) first") from None
        except ValueError as err:
            raise UserError(f"{path} is damaged ({err}): run the report stage of that run again") from None
    write_text_atomic(render_comparison(reports), args.out)
    print(f"wrote {args.out}")
    return 0


def synth(args) -> int:
    from storage.synth import generate_demo_dataset, generate_unlabelled_frames

    if args.unlabelled:
        root = args.root or Path("data/demo_unlabelled")
        names = generate_unlabelled_frames(
            root,
            num_images=args.num_images,
            height=args.height,
            width=args.width,
            seed=1 if args.seed is None else args.seed,
        )
        print(f"wrote {len(names)} unlabelled frames to {root}")
        return 0
    root = args.root or Path("data/demo_cityscapes")
    ids = generate_demo_dataset(
        root,
        split=args.split,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        seed=0 if args.seed is None else args.seed,
    )
    print(f"wrote {len(ids)} demo images to {root}")
    return 0


def run_stages(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command != "apply":  # apply labels another dataset into its own output_dir
        refuse_a_moved_runs_config(args.config, cfg.output_dir, args.overrides)
    # Ray and torch are imported only once the config is known to be good.
    from ray_jobs.apply import run_apply
    from ray_jobs.pipeline import STAGES, Pipeline
    from ray_jobs.session import init_ray

    if args.command == "apply":
        init_ray(cfg)
        run_apply(cfg, args.fit, args.mapping)
    else:
        Pipeline(cfg).run(STAGES if args.command == "run" else (args.command,))
    return 0


def import_fit(args) -> int:
    from core.errors import UserError

    run_dir = args.run.resolve()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(
            f"--run {args.run} is not the output_dir of a run (no {run_dir / 'config.yaml'}): name one "
            "like outputs/demo"
        )
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])  # the run, wherever we are
    from core.clustering.fit_artifact import FitArtifact
    from ray_jobs.pipeline import Pipeline
    from storage.run.lock import OutputLock, command_line

    with OutputLock(cfg.output_dir, command_line()):
        fit = FitArtifact.load(Pipeline(cfg).import_fit(args.source, args.name, (args.centroids_key, args.mapping_key)))
    origin = fit.meta["imported_from"]
    low, high = origin["row_norms"]
    print(
        f"{args.name}: imported {origin['file']} (sha256 {origin['sha256']}), k = {fit.k}, {fit.feature_dim}-d"
        + (
            f"; its rows were not unit length (norms {low:.3g} to {high:.3g}) and were L2-normalised: pixels take the "
            "nearest centre by cosine"
            if origin["rescaled_to_unit"]
            else ""
        )
        # output_dir named: a run copied or moved elsewhere still records where it was made
        + f". Next: python submit.py label --config {run_dir / 'config.yaml'} --set output_dir={run_dir} "
        "(or run), then report"
    )
    return 0


def atlas(args) -> int:
    from core.errors import UserError

    run_dir = args.fit.resolve().parent.parent
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{args.fit} is not a fit folder of a run (no {config}): name one like outputs/demo/fits/k300")
    cfg = load_config(config, [f"output_dir={run_dir}", *args.overrides])  # the run where the fit is, wherever we are
    from ray_jobs.apply import fit_run_inputs
    from ray_jobs.pipeline import Pipeline
    from ray_jobs.session import init_ray
    from storage.run.fits import fit_names
    from storage.run.layout import Layout
    from storage.run.lock import OutputLock, command_line
    from storage.run.placement import refuse_output_in_input

    name = args.fit.resolve().name
    out = args.out or run_dir / ("atlas" if name == fit_names(cfg)[0] else f"atlas_{name}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: name a folder for the atlas (it is made if missing)")
    layout, target = Layout(run_dir), out.resolve()
    stage_dirs = (layout.features, layout.fits, layout.scores, layout.labels, layout.histograms, layout.figures)
    if target == run_dir or any(target.is_relative_to(d) for d in stage_dirs):
        raise UserError(
            f"--out {out} is the run's own folder or one of its stages' folders, where the atlas would mix with "
            f"the run's results: name a folder of its own (default {run_dir / 'atlas'})"
        )
    # its sprite JPEGs would become images: nor in the run's recorded dataset, where --set dataset.root names a copy
    refuse_output_in_input(out, "--out", {"dataset.root": cfg.dataset.root, **fit_run_inputs(args.fit)})
    pipeline = Pipeline(cfg)
    with OutputLock(cfg.output_dir, command_line()):
        init_ray(cfg)
        page = pipeline.atlas(name, out)
    print(f"wrote {page}")
    return 0


COMMANDS = {"atlas": atlas, "compare": compare, "import-fit": import_fit, "synth": synth}


if __name__ == "__main__":
    code = main()
    _disconnect_quietly()  # here rather than at exit: a Ctrl-C while Ray shuts down is then no traceback
    sys.exit(code)
