"""ImageNet-1k class names, in the order of the model's logits."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def imagenet1k_classes() -> tuple[str, ...]:
    """The short label (first lemma) of each of the 1000 classes."""
    text = resources.files("skray.core").joinpath("imagenet1k_classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return tuple(lemmas.split(",")[0].strip() for _, _, lemmas in rows)


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet names for a 1000-way head, otherwise ``class_<i>``."""
    if num_classes == 1000:
        return list(imagenet1k_classes())
    return [f"class_{i}" for i in range(num_classes)]
