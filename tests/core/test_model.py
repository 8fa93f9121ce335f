"""SK-ResNeXt: the published architecture exactly, and its inference fast path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from skray.core.model import create_model, prepare_for_inference
from skray.core.specs import DEFAULT_MODEL, list_models

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
SMALL = "skresnext14_8x4d_half"


def reference_keys() -> list[tuple[str, str, tuple[int, ...]]]:
    rows = (FIXTURES / "skresnext50_32x4d.keys.tsv").read_text().splitlines()[1:]
    out = []
    for row in rows:
        key, dtype, shape = row.split("\t")
        out.append((key, dtype, tuple(int(s) for s in shape.split(",")) if shape else ()))
    return out


def fixture_state_dict() -> dict[str, torch.Tensor]:
    """The fixture README's fill rule: one generator, keys in the file's order."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, _, shape in reference_keys():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) * 0.5 + 0.75
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) * math.sqrt(1.0 / math.prod(shape[1:]))
    return state


@pytest.fixture(scope="module")
def golden_model() -> torch.nn.Module:
    model = create_model("skresnext50_32x4d")
    model.load_state_dict(fixture_state_dict(), strict=True)
    return model.eval()


def golden_input(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


def test_default_model_is_the_50_layer_one():
    assert DEFAULT_MODEL == "skresnext50_32x4d"
    assert {"skresnext50_32x4d", SMALL} <= set(list_models())


def test_state_dict_keys_and_shapes_equal_the_reference_exactly():
    model = create_model("skresnext50_32x4d")
    ours = {
        k: (str(v.dtype).removeprefix("torch."), tuple(v.shape))
        for k, v in model.state_dict().items()
    }
    ref = {k: (dtype, shape) for k, dtype, shape in reference_keys()}
    assert ours == ref
    assert sum(p.numel() for p in model.parameters()) == 27_479_784


@pytest.mark.parametrize("size", [224, 96])
def test_logits_match_the_reference_implementation(golden_model, size):
    golden = np.load(FIXTURES / "skresnext50_32x4d.golden.npz")[f"logits_{size}"]
    with torch.no_grad():
        logits = golden_model(golden_input(size)).numpy()
    assert np.abs(logits - golden).max() <= 1e-4


@pytest.mark.parametrize("size", [224, 96])
def test_fast_path_agrees_with_the_plain_model(golden_model, size):
    golden = np.load(FIXTURES / "skresnext50_32x4d.golden.npz")[f"logits_{size}"]
    fast = prepare_for_inference(golden_model)
    assert np.abs(fast(golden_input(size)).numpy() - golden).max() <= 1e-4


def test_fast_path_leaves_the_original_model_trainable(golden_model):
    prepare_for_inference(golden_model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in golden_model.modules())
    assert all(p.requires_grad for p in golden_model.parameters())


def test_fast_path_with_torch_compile_agrees():
    model = create_model(SMALL).eval()
    x = torch.randn(4, 3, 64, 64)  # the shape test_device_decode compiles: inductor's cache hits
    with torch.no_grad():
        plain = model(x)
    fast = prepare_for_inference(model, compile=True)
    assert torch.allclose(fast(x), plain, atol=1e-4)


def test_forward_features_and_any_input_of_at_least_32px():
    model = create_model(SMALL).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 96)).shape == (
            1,
            model.num_features,
            2,
            3,
        )
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
        assert model(torch.randn(1, 3, 77, 51)).shape == (1, 1000)
        with pytest.raises(ValueError, match="at least 32"):
            model(torch.randn(1, 3, 31, 64))


def test_reset_classifier_changes_only_the_head():
    model = create_model(SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    model.reset_classifier(7)
    assert model.num_classes == 7
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_small_variant_uses_the_same_blocks():
    small, big = create_model(SMALL), create_model()
    assert {type(m).__name__ for m in small.modules()} == {type(m).__name__ for m in big.modules()}
    assert sum(p.numel() for p in small.parameters()) < 3_000_000


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="skresnext50_32x4d"):
        create_model("resnet50")


def test_classifiers_without_weights_hold_one_and_the_same_model_in_every_process():
    from skray.inference.classifier import Classifier

    crops = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    torch.manual_seed(1)
    first = Classifier(SMALL).predict_tensors(crops)
    torch.manual_seed(2)  # another actor's global RNG state
    second = Classifier(SMALL).predict_tensors(crops)

    assert [p.topk_scores for p in first] == [p.topk_scores for p in second]
