"""Sweep entry point for ``ray job submit``.

ray job submit --working-dir . -- python pipelines/sweep.py --config configs/sweep_lr_wd.yaml
"""

from __future__ import annotations

import sys

from skray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
