"""The captioned scenes data set: determinism, the held-out split, captions and their parser, labels, prompt files."""

from __future__ import annotations

import pytest
import torch

from fewstep.conditions import PromptSet
from fewstep.errors import FewstepError
from fewstep.zoo.scenes import data as d

torch.set_num_threads(1)


def test_same_seed_is_bit_identical_and_other_seeds_differ():
    x1, c1, l1 = d.dataset("train", 200, seed=3)
    x2, c2, l2 = d.dataset("train", 200, seed=3)
    assert torch.equal(x1, x2) and c1 == c2 and torch.equal(l1, l2)
    x3, c3, _ = d.dataset("train", 200, seed=4)
    assert c3 != c1 and not torch.equal(x3, x1)
    # the same scenes rendered from another seed: same attributes, other jitter
    assert not torch.equal(d.render(d.scenes("train", 50, 3), seed=9), x1[:50])


def test_images_shapes_ranges_and_prefixes():
    x, caps, lab = d.dataset("all", 300, seed=0)
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert lab.shape == (300, 8) and lab.dtype == torch.long and len(caps) == 300
    assert d.scenes("train", 40, 5) == d.scenes("train", 400, 5)[:40]


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    train, held = d.labels(d.scenes("train", 20_000, 1)), d.labels(d.scenes("heldout", 5_000, 1))
    table = torch.tensor([[(s, c) in d.HELDOUT_PAIRS for c in d.COLOURS] for s in d.SHAPES])

    def has_heldout(rows: torch.Tensor) -> torch.Tensor:
        second = (rows[:, 3] >= 0) & table[rows[:, 3].clamp_min(0), rows[:, 4].clamp_min(0)]
        return table[rows[:, 0], rows[:, 1]] | second

    assert not has_heldout(train).any()
    assert has_heldout(held).all()
    # the train split still covers every shape, colour, size, relation and background, and one and two objects
    for col, k in enumerate(d.NUM_CLASSES):
        assert set(train[:, col].tolist()) >= set(range(k))
    # one object in half the draws, kept with odds 5/6 against (5/6)^2 for two: 30/55 of the train split
    assert (train[:, 3] < 0).float().mean().item() == pytest.approx(30 / 55, abs=0.02)
    # every held-out caption is a combination no train caption has
    train_caps = {d.caption(s) for s in d.scenes("train", 20_000, 1)}
    assert not train_caps & {d.caption(s) for s in d.scenes("heldout", 5_000, 1)}


def test_caption_round_trip_and_labels():
    sc = d.scenes("all", 500, 2)
    for s in sc:
        assert d.parse_caption(d.caption(s)) == s
    lab = d.labels(sc)
    assert [d.scene_of(r) for r in lab.tolist()] == sc
    one = d.Scene((d.SceneObject("triangle", "green", "large"),), None, "white")
    assert d.caption(one) == "a large green triangle on a white background"
    assert d.labels([one]).tolist() == [[2, 1, 1, -1, -1, -1, -1, 1]]
    two = d.parse_caption("A small red circle above a large blue square on a grey background.")
    assert d.labels([two]).tolist() == [[0, 0, 0, 1, 2, 1, 1, 0]]
    # size and background may be left out of a caption: -1 in the labels
    short = d.parse_caption("a red circle left of a blue square")
    assert d.labels([short]).tolist() == [[0, 0, -1, 1, 2, -1, 0, -1]]


def test_vocabulary_covers_every_caption():
    words = set(d.vocabulary())
    assert len(words) == len(d.WORDS)
    for c in d.dataset("all", 300, 7)[1]:
        assert set(c.split()) <= words


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("a red dragon on a grey background", "'dragon'"),
        ("a huge red circle right of a blue square", "'huge', 'right'"),
    ],
)
def test_unknown_words_are_named(text, named):
    with pytest.raises(FewstepError, match=f"unknown word\\(s\\) {named};"):
        d.parse_caption(text)


@pytest.mark.parametrize("text", ["red circle", "a circle red", "a red circle above", "a red circle on a background"])
def test_text_outside_the_grammar_is_refused(text):
    with pytest.raises(FewstepError, match="is not a scene caption"):
        d.parse_caption(text)


def test_bad_arguments_are_refused():
    with pytest.raises(FewstepError, match="unknown scene split 'test'"):
        d.scenes("test", 3)
    with pytest.raises(FewstepError, match="needs every size"):
        d.render([d.parse_caption("a red circle")])
    with pytest.raises(FewstepError, match="unknown colour 'pink'"):
        d.SceneObject("circle", "pink", "small")


def test_objects_are_where_the_relation_says(one_thread):
    # a red circle and a blue square on black: the first object's centre of mass is left of (above) the second's,
    # by more than the two differ across the relation's axis
    rows = torch.tensor([[0, 0, 0, 1, 2, 0, 0, 2], [0, 0, 1, 1, 2, 1, 1, 2]] * 20)
    x = d.render([d.scene_of(r) for r in rows.tolist()], seed=0)
    red = ((x[:, 0] > 0) & (x[:, 2] < 0)).float()
    blue = ((x[:, 2] > 0) & (x[:, 0] < 0)).float()
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i in range(x.shape[0]):
        assert red[i].sum() > 20 and blue[i].sum() > 20
        centre = [torch.stack([(m[i] * c).sum() / m[i].sum() for c in (xs, ys)]) for m in (red, blue)]
        along, across = (1, 0) if rows[i, 6] == 1 else (0, 1)
        gap = centre[1] - centre[0]
        assert gap[along] > 6 and abs(gap[across]) < 4.5


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_prompt_files_read_back(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    texts = d.write_prompts(path, "heldout", 40, seed=0)
    assert len(set(texts)) == 40
    ps = PromptSet.read(path)
    assert [e.prompt for e in ps.entries] == texts
    assert all(d.parse_caption(t).heldout for t in texts)
    with pytest.raises(FewstepError, match="give a .txt, .csv or .jsonl name"):
        d.write_prompts(tmp_path / "p.json", "train", 3)
