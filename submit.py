"""The one entry point, locally and under `ray job submit`.

    python submit.py run --config configs/demo.yaml          # every stage
    python submit.py extract|fit|label|report --config ...   # one stage, resuming from output_dir
    python submit.py synth --root data/demo_cityscapes       # only write the demo set
    python submit.py apply --config ... --fit outputs/demo/fits/k200 \
        --set dataset.kind=folder --set dataset.root=s3://bucket/frames --set output_dir=outputs/frames
                                                             # label unlabelled images with a saved fit
    python submit.py run --config ... --set fit.k=200        # override any config key
    python submit.py compare outputs/head outputs/backbone --out compare.md   # k sweeps side by side
"""

import argparse
import logging
import sys
from pathlib import Path

from configs.schema import load_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "extract", "fit", "label", "report"):
        p = sub.add_parser(name, help=f"run {'every stage' if name == 'run' else 'the ' + name + ' stage'}")
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set fit.k=200 (repeatable)")
    compare = sub.add_parser("compare", help="put the k sweeps of finished runs side by side (e.g. head vs backbone features)")
    compare.add_argument("runs", type=Path, nargs="+", help="output_dir of each run (holding report.json)")
    compare.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    apply = sub.add_parser("apply", help="label a folder or object-store URI of unlabelled images with a saved fit")
    apply.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    apply.add_argument("--fit", type=Path, required=True, help="a fit folder, e.g. outputs/demo/fits/k200")
    apply.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    synth = sub.add_parser("synth", help="write the generated Cityscapes-format demo set")
    synth.add_argument("--root", type=Path, default=Path("data/demo_cityscapes"))
    synth.add_argument("--split", default="val")
    synth.add_argument("--num-images", type=int, default=100)
    synth.add_argument("--height", type=int, default=256)
    synth.add_argument("--width", type=int, default=512)
    synth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "compare":
        import json

        from core.report import render_comparison
        from storage.shards import write_text_atomic
        missing = [str(r / "report.json") for r in args.runs if not (r / "report.json").is_file()]
        if missing:
            print(f"error: no report at {', '.join(missing)}: run the job (or its report stage) first", file=sys.stderr)
            return 2
        write_text_atomic(render_comparison({str(r): json.loads((r / "report.json").read_text()) for r in args.runs}), args.out)
        print(f"wrote {args.out}")
        return 0

    if args.command == "synth":
        from storage.synth import generate_demo_dataset
        ids = generate_demo_dataset(args.root, split=args.split, num_images=args.num_images,
                                    height=args.height, width=args.width, seed=args.seed)
        print(f"wrote {len(ids)} demo images to {args.root}")
        return 0

    from core.errors import UserError
    try:
        cfg = load_config(args.config, args.overrides)
        # Ray and torch are imported only once the config is known to be good.
        from ray_jobs.apply import run_apply
        from ray_jobs.pipeline import STAGES, Pipeline
        from ray_jobs.session import init_ray
        if args.command == "apply":
            init_ray(cfg)
            run_apply(cfg, args.fit)
        else:
            Pipeline(cfg).run(STAGES if args.command == "run" else (args.command,))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
