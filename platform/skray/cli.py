"""The ``skray`` command: one subcommand per job, each a thin shell over a run function."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence

from skray.core.errors import SkrayError
from skray.core.specs import DEFAULT_MODEL, list_models
from skray.io.storage import redact_text

# Exit codes: 0 complete; 1 failed (a traceback: a bug or a fault skray does not know);
# 2 refused (an error it names: config, input, access); 3 incomplete (storage faults left
# units unread past the retry budget): rerun to finish.
EXIT_FAILED, EXIT_REFUSED, EXIT_INCOMPLETE = 1, 2, 3

RANDOM_WEIGHTS_WARNING = (
    "warning: no --weights given: the model has RANDOM weights, so the labels are meaningless"
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="path, s3://, https:// URI, or 'pretrained'")
    parser.add_argument(
        "--model",
        choices=list_models(),
        help=f"architecture (default {DEFAULT_MODEL}, or the one recorded in the weights)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="fp32 (default); bf16; auto: bf16 on AMX/AVX512-BF16 CPUs and bf16 GPUs",
    )


def _add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from skray.core.images import ImageDecodeError
    from skray.inference.classifier import Classifier
    from skray.io.storage import read_bytes

    classifier = Classifier(args.model, args.weights, precision=args.precision or "fp32")
    if classifier.random_weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    if args.precision:  # asked for: say what it resolved to (``auto`` follows the hardware)
        print(f"precision {classifier.precision} ({classifier.precision_reason})", file=sys.stderr)
    failures = 0
    for start in range(0, len(args.images), args.batch_size):
        uris = args.images[start : start + args.batch_size]
        blobs: list[bytes] = []
        read_errors: dict[str, str] = {}
        for uri in uris:
            try:
                blobs.append(read_bytes(uri))
            except (OSError, ValueError) as err:
                read_errors[uri] = f"unreadable: {err}"
        results = iter(classifier.predict_bytes(blobs, args.top_k))
        for uri in uris:
            print(uri)
            result = read_errors.get(uri) or next(results)
            if isinstance(result, (str, ImageDecodeError)):
                failures += 1
                print(f"  error: {result}")
                continue
            for label_id, label, score in zip(
                result.topk_ids, result.topk_labels, result.topk_scores
            ):
                print(f"  {score:7.4f}  {label} ({label_id})")
    return 1 if failures == len(args.images) else 0


def cmd_label(args: argparse.Namespace) -> int:
    from skray.io.config import load_config
    from skray.label.config import LabelConfig

    flags = {
        "input": args.input,
        "output": args.output,
        "weights": args.weights,
        "model": args.model,
        "format": args.format,
        "batch_size": args.batch_size,
        "top_k": args.top_k,
        "overwrite": args.overwrite or None,
    }
    overrides = args.set + ([f"actors.precision={args.precision}"] if args.precision else [])
    cfg = load_config(
        LabelConfig, args.config, overrides, {k: v for k, v in flags.items() if v is not None}
    )
    # The job's modules import torch and Ray Data (seconds of CPU): a bad config fails first.
    from skray.label.job import run
    from skray.label.manifest import format_summary

    manifest = run(cfg)
    print(format_summary(manifest))
    return EXIT_INCOMPLETE if manifest["incomplete"] else 0


def cmd_train(args: argparse.Namespace) -> int:
    from skray.io.config import load_config
    from skray.train.config import TrainConfig

    cfg = None if args.resume else load_config(TrainConfig, args.config, args.set)
    from skray.train.driver import run  # torch: after the config's check, as for labeling

    summary = run(cfg, resume=args.resume)
    best = summary["best"]
    print(
        f"[train] done: best val_top1 {best['val_top1']:.2f} / top5 {best['val_top5']:.2f} "
        f"at epoch {best['epoch']}; run {summary['run_dir']}; "
        f"MLflow run {summary['mlflow_run_id']}; "
        f"model {summary['model']}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from skray.io.config import validate
    from skray.train.evaluate import EvaluateConfig, evaluate

    if not args.weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    given = {"image_size": args.image_size, "crop_pct": args.crop_pct}  # unset: the model's
    result = evaluate(
        validate(
            EvaluateConfig,
            {
                "data": args.data,
                "weights": args.weights,
                "model": args.model,
                "format": args.format,
                "batch_size": args.batch_size,
                "precision": args.precision or "fp32",
                "preprocessing": {k: v for k, v in given.items() if v is not None},
            },
            source="arguments",
        )
    )
    print(
        f"{result['model']} on {result['data']}: "
        f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
        f"({result['images']} images, {result['skipped']} undecodable)"
    )
    if args.mlflow_experiment:
        from skray.weights import store

        store.configure()
        run_id = store.start_run(
            args.mlflow_experiment, "evaluate", params=result, tags=store.run_tags(args.data)
        )
        store.log_metrics(run_id, {"top1": result["top1"], "top5": result["top5"]}, step=0)
        store.end_run(run_id)
        print(f"logged to MLflow run {run_id} in experiment {args.mlflow_experiment}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from skray.io.config import load_config
    from skray.train.sweep import SweepConfig, run

    cfg = load_config(SweepConfig, args.config, args.set)
    summary = run(cfg, resume=args.resume)
    for trial in summary["trials"]:
        print(
            f"[sweep] {trial['trial']}: {trial['state']}, {trial['epochs']} epochs, "
            f"best {trial['best']}"
        )
    best = summary["best"]
    print(
        f"[sweep] best: {best['trial'] if best else None} ({best['best'] if best else '-'}); "
        f"MLflow parent run {summary['parent_run_id']}; model {summary.get('model')}"
    )
    return 0 if best else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from skray.train.compare import compare, format_table

    rows, paths = compare(args.experiment, args.parent, args.metric, args.out, args.mode)
    print(format_table(rows, args.metric))
    for path in paths:
        print(f"plot: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from skray.serve.launch import resolve_launch, serve_forever

    flags = {"weights": args.weights, "model": args.model, "precision": args.precision}
    http = {"host": args.host, "port": args.port}
    launch = resolve_launch(
        args.config,
        args.app,
        args.set,
        args={k: v for k, v in flags.items() if v is not None},
        http={k: v for k, v in http.items() if v is not None},
    )
    if launch.config.weights is None:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    serve_forever(launch, address=args.address)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from skray.report.page import write_report

    print(f"report: {write_report(args.output, args.dest)}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from skray.report.review import write_review

    dest = write_review(args.output, args.n, args.dest, args.format, args.expires)
    print(f"review sample: {dest}")
    return 0


CONFIG_SCHEMAS = {
    "label": ("skray.label.config", "LabelConfig"),
    "train": ("skray.train.config", "TrainConfig"),
    "sweep": ("skray.train.sweep", "SweepConfig"),
    "serve": ("skray.serve.config", "ServeConfig"),
}


def cmd_config(args: argparse.Namespace) -> int:
    import importlib
    import json

    from skray.io.config import describe_keys

    module, name = CONFIG_SCHEMAS[args.job]
    schema = getattr(importlib.import_module(module), name)
    if args.json:
        print(json.dumps(schema.model_json_schema(), indent=2))
        return 0
    rows = [("key", "type", "default", "description"), *describe_keys(schema)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from skray.dev.demo import run_demo

    return run_demo(model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="print the top-k labels of images")
    predict.add_argument(
        "images", nargs="+", metavar="IMAGE_OR_URI", help="local path or s3:// URI"
    )
    _add_model_args(predict)
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--batch-size", type=int, default=16)
    predict.set_defaults(func=cmd_predict)

    label = sub.add_parser("label", help="label images in bulk on Ray Data, exactly once")
    label.add_argument("--config", help="YAML config (configs/label.yaml)")
    _add_overrides(label, "actors.max=4")
    label.add_argument("--input", help="local path or s3://bucket/prefix (globs allowed)")
    label.add_argument("--output", help="local path or s3://bucket/prefix for the Parquet parts")
    _add_model_args(label)
    label.add_argument("--format", choices=["auto", "images", "webdataset", "parquet"])
    label.add_argument("--batch-size", type=int)
    label.add_argument("--top-k", type=int)
    label.add_argument(
        "--overwrite", action="store_true", help="discard earlier output and start over"
    )
    label.set_defaults(func=cmd_label)

    train = sub.add_parser("train", help="train on Ray Train (the published recipe by default)")
    train.add_argument("--config", help="YAML config (configs/train_baseline.yaml)")
    _add_overrides(train, "optim.lr=0.05")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its directory (storage_path/name, local or s3://)",
    )
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", help="top-1/top-5 on a labeled image set (card eval transform)"
    )
    evaluate.add_argument("--data", required=True, help="ROOT/<class>/<image>, local or s3://")
    _add_model_args(evaluate)
    evaluate.add_argument("--format", default="folder", choices=["folder", "webdataset", "parquet"])
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--image-size", type=int, help="default: the model's (224)")
    evaluate.add_argument("--crop-pct", type=float, help="default: the model's (0.875)")
    evaluate.add_argument(
        "--mlflow-experiment", help="also log the result to this MLflow experiment"
    )
    evaluate.set_defaults(func=cmd_evaluate)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep over training keys (ASHA), in MLflow")
    sweep.add_argument(
        "--config", required=True, help="YAML sweep config (configs/sweep_lr_wd.yaml)"
    )
    _add_overrides(sweep, "search=grid")
    sweep.add_argument(
        "--resume", metavar="SWEEP_DIR", help="finish an interrupted sweep (storage_path/name)"
    )
    sweep.set_defaults(func=cmd_sweep)

    compare = sub.add_parser(
        "compare", help="runs side by side from MLflow, sorted by a metric, with plots"
    )
    compare.add_argument("--experiment", help="an MLflow experiment (default skray-train)")
    compare.add_argument("--parent", help="a sweep's parent run id: compare its trials")
    compare.add_argument("--metric", default="val_top1")
    compare.add_argument("--out", help="folder for the PNGs (default .skray/compare/...)")
    compare.add_argument(
        "--mode",
        choices=["max", "min"],
        help="best is max or min (default: the sweep's mode, else min for a loss or error)",
    )
    compare.set_defaults(func=cmd_compare)

    serve = sub.add_parser(
        "serve", help="the classifier behind a Ray Serve HTTP endpoint (until Ctrl-C)"
    )
    serve.add_argument(
        "--config", help="a Serve config file (configs/serve.yaml); default: built-in defaults"
    )
    serve.add_argument("--app", help="which application of the config file (when it has several)")
    _add_model_args(serve)
    _add_overrides(serve, "max_batch_size=32")
    serve.add_argument(
        "--host", help="bind address (default 127.0.0.1, or the config's http_options)"
    )
    serve.add_argument(
        "--port", type=int, help="HTTP port (default 8000, or the config's http_options)"
    )
    serve.add_argument(
        "--address", help="Ray cluster to deploy on (default RAY_ADDRESS, else a new local Ray)"
    )
    serve.set_defaults(func=cmd_serve)

    report = sub.add_parser(
        "report", help="an HTML report of a labeling output: labels, scores, failures, galleries"
    )
    report.add_argument("output", metavar="OUTPUT", help="the labeling output, local or s3://")
    report.add_argument(
        "--dest", help="folder for index.html and the PNGs (default OUTPUT/_report)"
    )
    report.set_defaults(func=cmd_report)

    review = sub.add_parser(
        "review", help="a review sample: stratified by label, lowest scores first"
    )
    review.add_argument("output", metavar="OUTPUT", help="the labeling output, local or s3://")
    review.add_argument("--n", type=int, default=200, help="rows in the sample (default 200)")
    review.add_argument("--format", default="csv", choices=["csv", "parquet"])
    review.add_argument("--dest", help="file to write (default OUTPUT/_review.csv or .parquet)")
    review.add_argument(
        "--expires",
        type=int,
        default=3600,
        help="seconds a presigned s3:// link stays valid (default 3600; at most 604800)",
    )
    review.set_defaults(func=cmd_review)

    config = sub.add_parser(
        "config", help="every key of a job's config: type, default and what it does"
    )
    config.add_argument("job", choices=sorted(CONFIG_SCHEMAS))
    config.add_argument("--json", action="store_true", help="the JSON schema instead")
    config.set_defaults(func=cmd_config)

    demo = sub.add_parser("demo", help="run the main job end to end on the embedded default")
    demo.add_argument("--model", default=DEFAULT_MODEL, choices=list_models())
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SkrayError as err:  # what the user gave cannot be used: the message says why
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception:  # a failure nobody foresaw: its traceback, with every URI redacted
        print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
