"""The ``skray`` command: one subcommand per job, each a thin shell over a run function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from skray.model import DEFAULT_MODEL, list_models

RANDOM_WEIGHTS_WARNING = (
    "warning: no --weights given: the model has RANDOM weights, so the labels are meaningless"
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="path, s3://, https:// URI, or 'pretrained'")
    parser.add_argument("--model", choices=list_models(), help=f"architecture (default {DEFAULT_MODEL}, "
                        "or the one recorded in the weights)")


def cmd_predict(args: argparse.Namespace) -> int:
    from skray.classifier import Classifier
    from skray.images import ImageDecodeError
    from skray.storage import read_bytes

    classifier = Classifier(args.model, args.weights)
    if classifier.random_weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
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
            for label_id, label, score in zip(result.topk_ids, result.topk_labels, result.topk_scores):
                print(f"  {score:7.4f}  {label} ({label_id})")
    return 1 if failures == len(args.images) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from skray.demo import run_demo

    return run_demo(workdir=Path(args.workdir), model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="print the top-k labels of images")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_URI", help="local path or s3:// URI")
    _add_model_args(predict)
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--batch-size", type=int, default=16)
    predict.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="run the main job end to end on the embedded default")
    demo.add_argument("--workdir", default=".skray/demo")
    demo.add_argument("--model", default=DEFAULT_MODEL, choices=list_models())
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
