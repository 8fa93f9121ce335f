r"""Bulk labeling entry point for ``ray job submit``.

ray job submit --working-dir . -- python pipelines/label.py --config configs/label.yaml \
    [--set key=value ...]
"""

from __future__ import annotations

import sys

from skray.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
