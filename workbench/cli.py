"""Command line: `workbench run | train | ingest | download | evaluate | predict | bench | params | lab`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from workbench.run import NOTEBOOKS, STAGE_NAMES


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.pipeline import PipelineError, continue_run, run_pipeline, run_seeds
    from workbench.runstatus import RunInterrupted

    if args.smoke:
        args.set = ["profile=smoke", *args.set]

    existing = args.resume or args.run_dir
    if args.resume and args.run_dir:
        print("error: give either --resume RUN_DIR or --run-dir RUN_DIR --from STAGE", file=sys.stderr)
        return 2
    if args.run_dir and not args.start:
        print(
            "error: --run-dir needs --from STAGE (e.g. --from 03); --resume continues an unfinished run",
            file=sys.stderr,
        )
        return 2
    if existing and (args.params or args.set or args.seeds or args.run_id):
        print(
            "error: an existing run keeps its parameters and id; give no PARAMS, --set, --seeds or --run-id",
            file=sys.stderr,
        )
        return 2
    if not existing and not args.params:
        print("error: give a parameter file (or --resume RUN_DIR / --run-dir RUN_DIR --from STAGE)", file=sys.stderr)
        return 2
    if args.start and not existing:
        print("error: --from re-runs stages of an existing run: add --run-dir RUN_DIR", file=sys.stderr)
        return 2
    options = {"progress": not args.quiet, "cell_timeout": args.cell_timeout, "notebooks": args.notebooks}
    try:
        if existing:
            result = continue_run(existing, start=args.start, **options)
        elif args.seeds:
            results, table = run_seeds(args.params, args.seeds, args.set, args.reports, run_id=args.run_id, **options)
            for result in results:
                print(f"{result.status}: {result.run_dir}")
            print(f"seed summary: {table}")
            return 0
        else:
            result = run_pipeline(args.params, args.set, args.reports, run_id=args.run_id, **options)
    except PipelineError as exc:
        print(f"run failed: {exc}", file=sys.stderr)
        return 1
    except RunInterrupted as exc:
        print(f"run interrupted by {exc.signal_name}; the state is recorded in run.json", file=sys.stderr)
        return exc.exit_code
    if result.status == "worker":
        print(f"rank finished: {result.run_dir}")
        return 0
    print(f"run complete: {result.run_dir}")
    for key in ("test.iou", "val.iou", "calibration.temperature", "review.top_k_recall", "wall_seconds"):
        if key in result.metrics:
            print(f"  {key} = {result.metrics[key]}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.train.launch import train_run

    result = train_run(Path(args.run_dir))
    print(f"trained: {result.model_dir}")
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
        args.model,
        args.store,
        parse_band_map(args.bands),
        reports=args.reports,
        tta=args.tta,
        n_worst=args.worst,
        normalize=args.normalize,
    )
    from workbench.report_pages import write_reports_index

    write_reports_index(args.reports)  # the evaluation's landing page (figures, metrics) and the runs index
    print(f"external evaluation: {run_dir}")
    for key in ("test.raw.iou", "test.calibrated.iou", "test.calibrated.f1", "calibration.ece_after"):
        if key in metrics:
            print(f"  {key} = {metrics[key]}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import warnings

    from workbench.data.ingest import parse_options
    from workbench.infer import predict_input

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _print_warning
        results = predict_input(
            Path(args.model_dir),
            Path(args.raster),
            Path(args.out),
            format=args.format,
            options=parse_options(args.option or []),
            window=args.window,
            stride=args.stride,
            memory_limit_mb=args.memory_limit_mb,
            min_area_m2=args.min_area_m2,
            scales=tuple(args.scales),
            tta=args.tta,
            bands=args.bands,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            threshold=args.threshold,
            region=args.region,
            scheduler=args.scheduler,
            workers=args.workers,
            allow_input_mismatch=args.allow_input_mismatch,
            allow_uncalibrated=args.uncalibrated,
            refuse_small_memory_limit=True,
            probabilities=not args.no_probabilities,
            progress=not args.quiet,
        )
    for result in results:
        for name, path in result.paths.items():
            print(f"wrote {name}: {path}")
        print(
            f"{result.n_polygons} polygon(s) at threshold {result.threshold:g}, window {result.window}, "
            f"{result.seconds:.1f} s, peak memory {result.peak_rss_mb:.0f} MB"
        )
    return 0


def _print_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    print(f"warning: {message}", file=sys.stderr)


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


def cmd_lab(args: argparse.Namespace) -> int:
    from workbench.lab import LabError, start_lab

    try:
        start_lab(args.run, port=args.port)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="EO segmentation workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the notebooks of a run with papermill")
    run.add_argument("params", nargs="?", help="parameter file, e.g. params/demo.yaml")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_epochs=2"
    )
    run.add_argument("--reports", default="reports", help="reports folder (default: reports)")
    run.add_argument("--seeds", type=int, nargs="+", help="run once per seed and summarise mean ± std")
    run.add_argument(
        "--notebooks",
        nargs="+",
        choices=STAGE_NAMES,
        metavar="NOTEBOOK",
        help=f"run only these notebooks, of {' '.join(NOTEBOOKS)} (or their prefixes 01 ... 04)",
    )
    run.add_argument(
        "--run-id", help="the run's id (folder name); launchers: the same on every rank (default: SLURM/torchrun id)"
    )
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a failed, interrupted or killed run")
    run.add_argument("--run-dir", metavar="RUN_DIR", help="an existing run whose stages --from re-runs")
    run.add_argument("--from", dest="start", metavar="STAGE", help="with --run-dir: re-run from this stage (e.g. 03)")
    run.add_argument(
        "--cell-timeout", type=int, metavar="SECONDS", help="stop a notebook cell running longer (default: none)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--smoke", action="store_true", help="the smoke profile (profile=smoke): the recipe on a CPU in minutes"
    )
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train a prepared run (started by the training stage for multi-process runs)")
    train.add_argument("run_dir", help="a run directory whose data stage has finished")
    train.set_defaults(func=cmd_train)
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
    evaluate.add_argument("--worst", type=int, default=6, help="four-panel figures of the N lowest-IoU chips (6)")
    evaluate.add_argument(
        "--normalize",
        default="model",
        choices=["model", "store"],
        help="model: the source run's train statistics (default); store: the same method on this store's chips",
    )
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser(
        "predict", help="sliding-window inference over a raster (GeoTIFF, any GDAL raster, or --format npz ...)"
    )
    predict.add_argument("model_dir", help="a model bundle, e.g. reports/<experiment>/<run-id>/model")
    predict.add_argument("raster", help="input raster file, or a file/folder in an ingest --format")
    predict.add_argument("out", help="output folder (probability.tif, mask.tif, polygons.geojson)")
    predict.add_argument("--window", type=int, help="window side in pixels (default: the training chip size)")
    predict.add_argument("--stride", type=int, help="window step (default: half the window)")
    predict.add_argument("--memory-limit-mb", type=float, help="memory for the blocks (default 1024)")
    predict.add_argument("--min-area-m2", type=float, default=0.0)
    predict.add_argument("--scales", type=float, nargs="+", default=[1.0])
    predict.add_argument("--tta", default="none", choices=["none", "minimal", "standard", "full"])
    predict.add_argument(
        "--no-probabilities",
        action="store_true",
        help="multiclass models: write only the class raster and polygons, not probability.tif (one float32 "
        "band per class)",
    )
    predict.add_argument(
        "--uncalibrated",
        action="store_true",
        help="use a model without calibration.json (temperature 1, threshold 0.5)",
    )
    predict.add_argument(
        "--bands",
        nargs="+",
        metavar="BAND",
        help="raster band (name or 1-based index) for each model band in order, or MODEL=RASTER pairs",
    )
    predict.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    predict.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    predict.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="autocast of the forward pass: bf16/fp16 on CUDA, bf16 on CPU (fp16 needs CUDA)",
    )
    predict.add_argument("--threshold", type=float, help="operating threshold (default: the calibrated one)")
    predict.add_argument("--region", help="use this region's calibrated threshold")
    predict.add_argument(
        "--scheduler",
        help="run the blocks through dask: threads (local) or a distributed scheduler address (tcp://host:8786)",
    )
    predict.add_argument("--workers", type=int, default=4, help="blocks in flight with --scheduler")
    predict.add_argument("--format", help="read the input with this ingest reader (npz, landslide4sense, ...)")
    predict.add_argument("--option", action="append", metavar="KEY=VALUE", help="reader option for --format")
    predict.add_argument(
        "--allow-input-mismatch",
        action="store_true",
        help="warn instead of refusing a raster whose value scale or pixel size differs from the training data",
    )
    predict.add_argument("--quiet", action="store_true", help="no progress bars")
    predict.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="side-by-side benchmarks written under reports/bench/")
    bench.add_argument("what", choices=["data", "train", "infer", "review", "all"])
    bench.add_argument("--reports", default="reports")
    bench.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    bench.set_defaults(func=cmd_bench)

    show = sub.add_parser("params", help="validate a parameter file and print the resolved parameters")
    show.add_argument("params")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=cmd_params)
    lab = sub.add_parser("lab", help="JupyterLab on 127.0.0.1 with a token, optionally working in a run directory")
    lab.add_argument("run", nargs="?", help="run directory reports/<experiment>/<run-id> the notebooks work in")
    lab.add_argument("--port", type=int, default=8888)
    lab.set_defaults(func=cmd_lab)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `workbench` command."""
    from workbench.params import ParamsError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ParamsError, FileNotFoundError, ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
