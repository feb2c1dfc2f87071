"""Command line: `workbench run | ingest | download | evaluate | predict | bench | params`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from workbench.run import NOTEBOOKS


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.pipeline import PipelineError, run_pipeline, run_seeds

    if args.smoke:
        args.set = ["profile=smoke", *args.set]

    try:
        if args.seeds:
            results, table = run_seeds(args.params, args.seeds, args.set, args.reports, progress=not args.quiet)
            for result in results:
                print(f"{result.status}: {result.run_dir}")
            print(f"seed summary: {table}")
            return 0
        result = run_pipeline(args.params, args.set, args.reports, notebooks=args.notebooks, progress=not args.quiet)
    except PipelineError as exc:
        print(f"run failed: {exc}", file=sys.stderr)
        return 1
    print(f"run complete: {result.run_dir}")
    for key in ("test.iou", "val.iou", "calibration.temperature", "review.top_k_recall", "wall_seconds"):
        if key in result.metrics:
            print(f"  {key} = {result.metrics[key]}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from workbench.data.ingest import ingest, parse_options

    report = ingest(
        args.format,
        Path(args.src),
        Path(args.dest),
        chip_size=args.chip_size,
        stride=args.stride,
        overwrite=args.overwrite,
        split=args.split,
        split_options=parse_options(args.split_option or []),
        **parse_options(args.option or []),
    )
    print(report.summary())
    for path, reason in report.skipped:
        print(f"  skipped {path}: {reason}")
    for path in report.unpaired:
        print(f"  unpaired {path}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from workbench.data.download import DownloadError, describe_datasets, download

    if args.list:
        print(describe_datasets())
        return 0
    if not args.name or not args.dest:
        print("error: give NAME and DEST (or --list to see the data sets)", file=sys.stderr)
        return 2
    try:
        result = download(
            args.name,
            Path(args.dest),
            url_base=args.url_base,
            retries=args.retries,
            timeout=args.timeout,
            extract=not args.no_extract,
            progress=not args.quiet,
        )
    except DownloadError as exc:
        print(f"download failed: {exc}", file=sys.stderr)
        return 1
    print(f"{len(result.files)} file(s) in {result.dest}; manifest {result.manifest}")
    print(f"next: {result.next_command}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from workbench.data.bands import parse_band_map
    from workbench.stages.external import evaluate_external

    run_dir, metrics = evaluate_external(
        args.model, args.store, parse_band_map(args.bands), reports=args.reports, tta=args.tta
    )
    print(f"external evaluation: {run_dir}")
    for key in ("test.raw.iou", "test.calibrated.iou", "test.calibrated.f1", "calibration.ece_after"):
        if key in metrics:
            print(f"  {key} = {metrics[key]}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from workbench.infer import predict_raster

    result = predict_raster(
        Path(args.model_dir),
        Path(args.raster),
        Path(args.out),
        window=args.window,
        stride=args.stride,
        memory_limit_mb=args.memory_limit_mb,
        min_area_m2=args.min_area_m2,
        scales=tuple(args.scales),
        tta=args.tta,
    )
    for name, path in result.paths.items():
        print(f"wrote {name}: {path}")
    print(f"{result.n_polygons} polygon(s), {result.seconds:.1f} s, peak memory {result.peak_rss_mb:.0f} MB")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from workbench.bench import run_benchmark

    path = run_benchmark(args.what, Path(args.reports), quick=args.quick)
    print(f"benchmark results: {path}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from workbench.params import load_params

    params = load_params(args.params, args.set)
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="EO segmentation workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the notebooks of a run with papermill")
    run.add_argument("params", help="parameter file, e.g. params/demo.yaml")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_epochs=2"
    )
    run.add_argument("--reports", default="reports", help="reports folder (default: reports)")
    run.add_argument("--seeds", type=int, nargs="+", help="run once per seed and summarise mean ± std")
    run.add_argument("--notebooks", nargs="+", help=f"run only these notebooks, of {' '.join(NOTEBOOKS)}")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--smoke", action="store_true", help="the smoke profile (profile=smoke): the recipe on a CPU in minutes"
    )
    run.set_defaults(func=cmd_run)

    from workbench.data.formats import FORMAT_NAMES

    ingest = sub.add_parser("ingest", help="turn an external data set into a chip store")
    ingest.add_argument("format", metavar="FORMAT", help="one of: " + ", ".join(FORMAT_NAMES))
    ingest.add_argument("src")
    ingest.add_argument("dest")
    ingest.add_argument("--chip-size", type=int)
    ingest.add_argument("--stride", type=int)
    ingest.add_argument("--option", action="append", metavar="KEY=VALUE", help="reader option (YAML value)")
    ingest.add_argument("--overwrite", action="store_true")
    ingest.add_argument(
        "--split",
        choices=["catalog", "random", "source", "rows", "block", "region"],
        help="write this split into the catalog (random, source or rows need no coordinates)",
    )
    ingest.add_argument(
        "--split-option",
        action="append",
        metavar="KEY=VALUE",
        help="split setting, e.g. train_percent=70, buffer_px=64",
    )
    ingest.set_defaults(func=cmd_ingest)

    fetch = sub.add_parser("download", help="fetch a public data set (resumable, checksummed) for `ingest`")
    fetch.add_argument("name", nargs="?", help="data set name; --list shows them")
    fetch.add_argument("dest", nargs="?", help="destination folder")
    fetch.add_argument("--list", action="store_true", help="print the data sets, their sources and licences")
    fetch.add_argument("--url-base", help="mirror address replacing the source's (Hub endpoint for Hub data sets)")
    fetch.add_argument("--retries", type=int, default=5, help="retries per file after a cut connection")
    fetch.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a retry")
    fetch.add_argument("--no-extract", action="store_true", help="keep archives packed")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(func=cmd_download)

    evaluate = sub.add_parser("evaluate", help="score a trained model on another chip store, as a run of its own")
    evaluate.add_argument("model", metavar="MODEL_OR_RUN", help="a run directory or its model/ folder")
    evaluate.add_argument("store", metavar="STORE", help="chip store to score (every labelled chip)")
    evaluate.add_argument("--bands", help="MODEL=STORE band pairs, comma separated (aliases are matched already)")
    evaluate.add_argument("--reports", default="reports")
    evaluate.add_argument("--tta", default="none", choices=["none", "minimal", "standard", "full"])
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="sliding-window inference over a GeoTIFF")
    predict.add_argument("model_dir")
    predict.add_argument("raster")
    predict.add_argument("out")
    predict.add_argument("--window", type=int)
    predict.add_argument("--stride", type=int)
    predict.add_argument("--memory-limit-mb", type=int)
    predict.add_argument("--min-area-m2", type=float, default=0.0)
    predict.add_argument("--scales", type=float, nargs="+", default=[1.0])
    predict.add_argument("--tta", default="none", choices=["none", "minimal", "standard", "full"])
    predict.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="side-by-side benchmarks written under reports/bench/")
    bench.add_argument("what", choices=["data", "train", "infer", "all"])
    bench.add_argument("--reports", default="reports")
    bench.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    bench.set_defaults(func=cmd_bench)

    show = sub.add_parser("params", help="validate a parameter file and print the resolved parameters")
    show.add_argument("params")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `workbench` command."""
    from workbench.params import ParamsError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ParamsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
