r"""Training entry point for ``ray job submit``.

ray job submit --working-dir . -- python pipelines/train.py \
    --config configs/train_baseline.yaml [--set key=value ...]
ray job submit --working-dir . -- python pipelines/train.py --resume s3://bucket/skray/train/RUN
"""

from __future__ import annotations

import sys

from skray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
