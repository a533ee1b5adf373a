"""The scenes attribute classifier: accuracy on both splits, prompt adherence (own vs shuffled captions, noisy
and blurred renders), recipe reproducibility, the weights cache, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.errors import FewstepError, ShapeError
from fewstep.zoo.scenes import classifier as C
from fewstep.zoo.scenes import data as d

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    """The shipped recipe's classifier (trained once per cache, about two minutes on one thread)."""
    return C.attribute_classifier()


@pytest.fixture(scope="module")
def heldout():
    return d.dataset("heldout", 600, seed=123)


def test_stored_accuracy_is_high_on_both_splits(net):
    assert net.accuracy.shape == (2, 8)
    assert float(net.accuracy.min()) > 0.97, net.accuracy


def test_adherence_to_own_captions_and_to_shuffled_ones(net, heldout):
    x, caps, lab = heldout
    own = C.prompt_adherence(x, caps, net)
    assert own["n"] == 600
    assert own["adherence"] > 0.99 and own["all_correct"] > 0.95
    assert min(own["per_attribute"].values()) > 0.97
    assert C.prompt_adherence(x, lab, net)["adherence"] == own["adherence"]  # labels serve as captions
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    shuffled = C.prompt_adherence(x, [caps[i] for i in perm], net)
    # images against other images' captions: what an image shows is independent of the caption, so near chance
    assert abs(shuffled["adherence"] - own["chance"]) < 0.06, (shuffled, own["chance"])
    assert 0.25 < own["chance"] < 0.45 and shuffled["all_correct"] < 0.02


def test_adherence_survives_noise_and_blur(net, heldout):
    x, caps, _ = heldout
    g = torch.Generator().manual_seed(1)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    blurred = C.blur(x, torch.full((x.shape[0],), 0.8))
    for imgs in (noisy, blurred):
        assert C.prompt_adherence(imgs, caps, net)["adherence"] > 0.97


def test_adherence_counts_stated_attributes_only():
    want = d.labels([d.parse_caption("a red circle left of a blue square"), d.parse_caption("a large red circle")])
    pred = torch.tensor([[0, 0, 1, 1, 2, 0, 0, 2], [0, 0, 0, 1, 1, 1, 0, 0]])  # second: wrong size, extra object
    out = C.adherence_of(pred, want)
    # first: 5 stated attributes + the object count, all shown; second: size wrong, count wrong, 3 / 5 (bg unsaid)
    assert out["adherence"] == pytest.approx((1.0 + 2 / 4) / 2)
    assert out["all_correct"] == 0.5 and out["per_attribute"]["size1"] == 0.0
    assert out["per_attribute"]["objects"] == 0.5 and math.isnan(out["per_attribute"]["background"])


def test_recipe_reproduces_its_first_steps():
    r = C.recipe_for(steps=3, batch=16, eval=50)
    a, b = C.train_classifier(r), C.train_classifier(r)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["head.weight"], C.train_classifier(C.recipe_for(steps=3, batch=16, eval=50, seed=1))["head.weight"]
    )


def test_damaged_cache_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    monkeypatch.setattr(C, "_MEMORY", {})
    r = dict(steps=2, batch=8, eval=20)
    path = C.classifier_path(C.recipe_for(**r))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    calls = []
    real = C.train_classifier
    monkeypatch.setattr(C, "train_classifier", lambda recipe: calls.append(1) or real(recipe))
    net = C.attribute_classifier(**r)
    assert calls == [1] and path.stat().st_size > 100_000
    C._MEMORY.clear()
    again = C.attribute_classifier(**r)  # a good file is read back, not retrained
    assert calls == [1] and torch.equal(again.head.weight, net.head.weight)
    # a file with the right recipe but non-finite weights is not trusted either
    from fewstep.training import write_weights

    bad = {k: v.clone() for k, v in net.state_dict().items()}
    bad["head.weight"][0, 0] = float("nan")
    write_weights(path, bad, C.recipe_for(**r), 1.0)
    C._MEMORY.clear()
    C.attribute_classifier(**r)
    assert calls == [1, 1]


def test_bad_input_is_one_clear_error(net):
    with pytest.raises(ShapeError, match=r"takes images \(N, 3, 32, 32\)"):
        C.predict(torch.zeros(2, 1, 8, 8), net)
    with pytest.raises(ShapeError, match="2 images but 1 captions"):
        C.prompt_adherence(torch.zeros(2, 3, 32, 32), ["a red circle"], net)
    with pytest.raises(FewstepError, match="unknown word"):
        C.prompt_adherence(torch.zeros(1, 3, 32, 32), ["a pink elephant"], net)
    with pytest.raises(FewstepError, match="unknown scenes classifier recipe field 'stepz'"):
        C.recipe_for(stepz=3)


def test_features_for_frechet_distance(net, heldout):
    from fewstep.metrics.features import FeatureMap

    x = heldout[0][:64]
    f = C.features(x, net)
    assert f.shape == (64, 128) and f.dtype == torch.float64
    fm = FeatureMap(C.Features(net))
    assert fm.num_features == 128 and torch.allclose(fm(x), f)


def test_the_shipped_classifier_is_the_current_recipe(tmp_path, monkeypatch):
    """The package's weights carry the default recipe's hash, so a fresh cache reads them instead of training."""
    from fewstep.training import read_weights

    assert read_weights(C.SHIPPED, C.recipe_for()) is not None
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    monkeypatch.setattr(C, "_MEMORY", {})
    monkeypatch.setattr(C, "train_classifier", lambda recipe: pytest.fail("trained instead of reading the package"))
    net = C.attribute_classifier()
    assert float(net.accuracy.min()) > 0.997  # per attribute, on fresh renders of both splits
