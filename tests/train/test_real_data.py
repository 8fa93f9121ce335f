"""The held-out data: real images that no one here wrote.

scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes, shipped inside the
scikit-learn package) become a stratified 80/20 folder dataset of 32 px RGB PNGs. The README's
CPU training command learns them in ``test_train.py`` (its shared ``learned`` run), and
``tests/inference/test_precision.py`` checks bf16 inference against fp32 on them.
"""

from __future__ import annotations

import pytest

from skray.dev.testing import DIGIT_CLASSES, write_digits_folder

pytest.importorskip("sklearn")


def test_the_digits_split_is_stratified_deterministic_and_disjoint(tmp_path):
    first = write_digits_folder(str(tmp_path / "a"))
    second = write_digits_folder(str(tmp_path / "b"))
    listing = {
        split: {
            c: sorted(p.name for p in (tmp_path / "a" / split / c).iterdir()) for c in DIGIT_CLASSES
        }
        for split in ("train", "val")
    }
    assert listing == {
        split: {
            c: sorted(p.name for p in (tmp_path / "b" / split / c).iterdir()) for c in DIGIT_CLASSES
        }
        for split in ("train", "val")
    }
    assert first["train"].endswith("/train") and second["val"].endswith("/val")
    train = sum(len(names) for names in listing["train"].values())
    val = sum(len(names) for names in listing["val"].values())
    assert (train, val) == (1438, 359)
    for c in DIGIT_CLASSES:  # every class in both, about 20% held out, no image in both
        assert not set(listing["train"][c]) & set(listing["val"][c])
        assert (
            0.15
            < len(listing["val"][c]) / (len(listing["val"][c]) + len(listing["train"][c]))
            < 0.25
        )
