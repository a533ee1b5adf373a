"""Captioned scenes: 32x32 RGB images of one or two shapes, made from a seed in pure torch.

A scene is one or two objects, each a shape (circle, square, triangle, cross), a colour (red, green,
blue, yellow, purple, cyan) and a size (small, large), on a background (grey, white, black). Two
objects stand in a relation, "left of" or "above", and the first object named is always the left
(top) one, so an image has exactly one caption::

    a small red circle above a large blue square on a grey background
    a large green triangle on a white background

Splits (:func:`scenes`): ``"heldout"`` scenes hold at least one object whose (shape, colour) pair is in
:data:`HELDOUT_PAIRS` (one pair per shape, each colour at most once); ``"train"`` scenes hold none, so
every held-out caption is a combination of words that never occurs together in training. ``"all"``
draws from the whole grammar (the attribute classifier trains on it). Attributes are uniform: one or
two objects with equal odds, then each attribute independently; a split keeps the draws that belong
to it (rejection, in fixed blocks, so the first m of n scenes are the m scenes). Two objects are
held out more often than one, so 30/55 of train scenes hold one object, and 6/17 of held-out ones.

Rendering (:func:`render`) is anti-aliased (coverage from a signed distance, one pixel wide) with
jitter inside each attribute: radius (small 3.6-4.6 px, large 6.4-7.6 px), position (one object near
the centre; two objects on either side of the centre line, never overlapping, offset across the
relation's axis by at most 4 px), object colour +-0.05 and background +-0.03 per channel (on [0, 1]).
Images come out in [-1, 1].

Labels (:func:`labels`, :data:`LABELS`): (N, 8) long, columns ``shape1, colour1, size1, shape2,
colour2, size2, relation, background``, each the index into :data:`SHAPES`, :data:`COLOURS`,
:data:`SIZES`, :data:`RELATIONS`, :data:`BACKGROUNDS`; -1 where the scene has no such attribute (no
second object, so no relation) or a parsed caption leaves it out (size and background are optional
in captions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...errors import FewstepError
from ...io import write_text

#: names what this module draws and renders: change it with any change to the scenes of a seed (recipes of
#: models trained on the scenes record it, so their cached weights are retrained)
VERSION = "fewstep-scenes/1"
SIZE = 32
SHAPE = (3, SIZE, SIZE)
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
RELATIONS = ("left of", "above")
BACKGROUNDS = ("grey", "white", "black")
#: the label columns of :func:`labels`
LABELS = ("shape1", "colour1", "size1", "shape2", "colour2", "size2", "relation", "background")
#: classes per label column
NUM_CLASSES = (4, 6, 2, 4, 6, 2, 2, 3)
#: (shape, colour) pairs that occur only in the held-out split
HELDOUT_PAIRS = frozenset({("circle", "blue"), ("square", "yellow"), ("triangle", "red"), ("cross", "purple")})
SPLITS = ("train", "heldout", "all")

RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.10),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.65, 0.15, 0.85),
    "cyan": (0.10, 0.80, 0.85),
}
BACKGROUND_RGB = {"grey": (0.50, 0.50, 0.50), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05)}
RADIUS = {"small": (3.6, 4.6), "large": (6.4, 7.6)}
COLOUR_JITTER, BACKGROUND_JITTER, CROSS_OFFSET = 0.05, 0.03, 2.0

#: every word a caption can contain
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", *SIZES, *COLOURS, *SHAPES, *(w for r in RELATIONS for w in r.split()), "on", *BACKGROUNDS, "background"]
    )
)


def vocabulary() -> list[str]:
    """Every word a caption can contain (for the tiny tokenizers)."""
    return list(WORDS)


@dataclass(frozen=True)
class SceneObject:
    """One object: ``shape``, ``colour`` and ``size`` (None: a caption that does not say)."""

    shape: str
    colour: str
    size: str | None = None

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, COLOURS, "colour")
        if self.size is not None:
            _check(self.size, SIZES, "size")


@dataclass(frozen=True)
class Scene:
    """One or two ``objects`` (the first left of / above the second), their ``relation``, the ``background``."""

    objects: tuple[SceneObject, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise FewstepError(f"a scene holds one or two objects; got {len(self.objects)}")
        if (self.relation is None) != (len(self.objects) == 1):
            raise FewstepError("a scene of two objects needs a relation, and one of one object has none")
        if self.relation is not None:
            _check(self.relation, RELATIONS, "relation")
        if self.background is not None:
            _check(self.background, BACKGROUNDS, "background")

    @property
    def heldout(self) -> bool:
        """Whether an object's (shape, colour) pair is held out of the training split."""
        return any((o.shape, o.colour) in HELDOUT_PAIRS for o in self.objects)


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise FewstepError(f"unknown {what} {value!r}; valid: {', '.join(allowed)}")


def caption(scene: Scene) -> str:
    """The caption of ``scene``, e.g. ``"a small red circle above a large blue square on a grey background"``."""

    def obj(o: SceneObject) -> str:
        return " ".join(["a", *([o.size] if o.size else []), o.colour, o.shape])

    text = obj(scene.objects[0])
    if scene.relation is not None:
        text += f" {scene.relation} {obj(scene.objects[1])}"
    if scene.background is not None:
        text += f" on a {scene.background} background"
    return text


_GRAMMAR = "a [SIZE] COLOUR SHAPE [left of|above a [SIZE] COLOUR SHAPE] [on a BACKGROUND background]"


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (size and background may be left out: None); FewstepError naming the words
    outside :data:`WORDS`, or the grammar, when ``text`` is not a scene caption."""
    words = re.sub(r"[.,;!]", " ", str(text).lower()).split()
    unknown = list(dict.fromkeys(w for w in words if w not in WORDS))
    if unknown:
        raise FewstepError(
            f"caption {text!r}: unknown word(s) {', '.join(repr(w) for w in unknown)}; "
            f"the scene vocabulary is: {' '.join(WORDS)}"
        )
    scene = _parse(words)
    if scene is None:
        raise FewstepError(f"caption {text!r} is not a scene caption: expected {_GRAMMAR!r}")
    return scene


def _parse(words: list[str]) -> Scene | None:
    first, i = _parse_object(words, 0)
    if first is None:
        return None
    objects, relation = [first], None
    for rel in RELATIONS:
        r = rel.split()
        if words[i : i + len(r)] == r:
            second, i = _parse_object(words, i + len(r))
            if second is None:
                return None
            objects.append(second)
            relation = rel
            break
    background = None
    if i + 4 == len(words) and words[i : i + 2] == ["on", "a"] and words[i + 3] == "background":
        background, i = words[i + 2], i + 4
    if i != len(words) or (background is not None and background not in BACKGROUNDS):
        return None
    return Scene(tuple(objects), relation, background)


def _parse_object(words: list[str], i: int) -> tuple[SceneObject | None, int]:
    if words[i : i + 1] != ["a"]:
        return None, i
    i += 1
    size = words[i] if i < len(words) and words[i] in SIZES else None
    i += size is not None
    if i + 2 > len(words) or words[i] not in COLOURS or words[i + 1] not in SHAPES:
        return None, i
    return SceneObject(words[i + 1], words[i], size), i + 2


def labels(scenes: Sequence[Scene]) -> Tensor:
    """Label matrix (N, 8) long of ``scenes`` (columns :data:`LABELS`, -1 where absent or unsaid)."""
    rows = []
    for s in scenes:
        row = []
        for o in (*s.objects, None)[:2]:
            if o is None:
                row += [-1, -1, -1]
            else:
                row += [_index(o.shape, SHAPES), _index(o.colour, COLOURS), _index(o.size, SIZES)]
        row += [_index(s.relation, RELATIONS), _index(s.background, BACKGROUNDS)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(LABELS))


def _index(value: str | None, names: Sequence[str]) -> int:
    return names.index(value) if value else -1


def scene_of(label_row: Sequence[int]) -> Scene:
    """The scene of one label row (8,) (the inverse of :func:`labels`)."""
    r = [int(v) for v in label_row]
    objects = tuple(
        SceneObject(SHAPES[r[k]], COLOURS[r[k + 1]], SIZES[r[k + 2]] if r[k + 2] >= 0 else None)
        for k in (0, 3)
        if r[k] >= 0
    )
    return Scene(objects, RELATIONS[r[6]] if r[6] >= 0 else None, BACKGROUNDS[r[7]] if r[7] >= 0 else None)


_BLOCK = 4096
_HELDOUT_TABLE = torch.tensor([[(s, c) in HELDOUT_PAIRS for c in COLOURS] for s in SHAPES])


def scenes(split: str, n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes of ``split`` ("train", "heldout" or "all"), drawn from ``seed`` (the first m of n are the m)."""
    if split not in SPLITS:
        raise FewstepError(f"unknown scene split {split!r}; valid: {', '.join(SPLITS)}")
    if n < 0:
        raise FewstepError(f"the number of scenes must be >= 0; got {n}")
    g = torch.Generator().manual_seed(_mix(seed, 1))
    kept: list[Tensor] = []
    count = 0
    while count < n:
        block = _draw_block(g)
        if split != "all":
            block = block[_is_heldout(block) == (split == "heldout")]
        kept.append(block)
        count += block.shape[0]
    rows = torch.cat(kept)[:n] if kept else torch.zeros(0, len(LABELS), dtype=torch.long)
    return [scene_of(r) for r in rows.tolist()]


def _mix(seed: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + salt * 7919) % (2**63 - 1)


def _draw_block(g: torch.Generator) -> Tensor:
    """(B, 8) label rows drawn uniformly: object count, then every attribute independently."""
    cols = [torch.randint(k, (_BLOCK,), generator=g) for k in NUM_CLASSES]
    rows = torch.stack(cols, 1)
    one = torch.randint(2, (_BLOCK,), generator=g) == 0
    rows[one, 3:7] = -1
    return rows


def _is_heldout(rows: Tensor) -> Tensor:
    """(B,) bool: a row holds a held-out (shape, colour) pair."""
    first = _HELDOUT_TABLE[rows[:, 0], rows[:, 1]]
    second = (rows[:, 3] >= 0) & _HELDOUT_TABLE[rows[:, 3].clamp_min(0), rows[:, 4].clamp_min(0)]
    return first | second


def render(scenes: Sequence[Scene], seed: int = 0) -> Tensor:
    """Images (N, 3, 32, 32) float32 in [-1, 1] of ``scenes``, with jitter drawn from ``seed``."""
    rows = labels(scenes)
    if (rows[:, [2, 7]] < 0).any() or ((rows[:, 3] >= 0) & (rows[:, 5] < 0)).any():
        raise FewstepError("render needs every size and the background of each scene; a parsed caption left one out")
    g = torch.Generator().manual_seed(_mix(seed, 2))
    n = rows.shape[0]
    u = torch.rand(n, 12, generator=g)
    jitter = torch.rand(n, 9, generator=g) * 2 - 1
    out = torch.empty(n, *SHAPE)
    for i in range(0, n, 2048):
        sl = slice(i, i + 2048)
        out[sl] = _render_rows(rows[sl], u[sl], jitter[sl])
    return out


def _render_rows(rows: Tensor, u: Tensor, jitter: Tensor) -> Tensor:
    """Render label rows (B, 8) with uniform draws u (B, 12) in [0, 1) and jitter (B, 9) in [-1, 1)."""
    dt = torch.float32
    lo = torch.tensor([RADIUS[s][0] for s in SIZES], dtype=dt)
    hi = torch.tensor([RADIUS[s][1] for s in SIZES], dtype=dt)
    size = rows[:, [2, 5]].clamp_min(0)
    r = lo[size] + u[:, 0:2] * (hi - lo)[size]  # (B, 2)
    cx, cy = _positions(rows, r, u)
    palette = torch.tensor([RGB[c] for c in COLOURS], dtype=dt)
    bgs = torch.tensor([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=dt)
    img = (bgs[rows[:, 7]] + BACKGROUND_JITTER * jitter[:, 6:9])[:, :, None, None].expand(-1, -1, SIZE, SIZE)
    pix = torch.arange(SIZE, dtype=dt) + 0.5
    for k in range(2):
        present = rows[:, 3 * k] >= 0
        col = palette[rows[:, 3 * k + 1].clamp_min(0)] + COLOUR_JITTER * jitter[:, 3 * k : 3 * k + 3]
        px = pix[None, None, :] - cx[:, k, None, None]  # (B, 1, W)
        py = pix[None, :, None] - cy[:, k, None, None]  # (B, H, 1)
        sdf = _sdf(rows[:, 3 * k].clamp_min(0), px, py, r[:, k, None, None])
        cover = (0.5 - sdf).clamp(0.0, 1.0) * present[:, None, None]
        img = img + cover[:, None] * (col[:, :, None, None] - img)
    return (img.clamp(0.0, 1.0) * 2.0 - 1.0).float()


def _positions(rows: Tensor, r: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Centres (cx, cy), each (B, 2), in pixels: along the relation's axis the first object sits before the
    centre line and the second after it; across it both sit near one shared line."""
    mid = SIZE / 2
    along = torch.stack(
        [
            r[:, 0] + 0.5 + u[:, 2] * (mid - 2 * r[:, 0] - 1).clamp_min(0),
            mid + r[:, 1] + 0.5 + u[:, 3] * (mid - 2 * r[:, 1] - 1).clamp_min(0),
        ],
        1,
    )
    rmax = r.max(1).values
    line = rmax + 2.5 + u[:, 4] * (SIZE - 5 - 2 * rmax).clamp_min(0)
    across = (line[:, None] + CROSS_OFFSET * (2 * u[:, 5:7] - 1)).clamp(min=r + 0.5, max=SIZE - r - 0.5)
    # one object: anywhere within 4 px of the centre that keeps it inside the frame
    one_lo, one_hi = (
        torch.maximum(r[:, 0] + 0.5, torch.tensor(mid - 4)),
        torch.minimum(SIZE - r[:, 0] - 0.5, torch.tensor(mid + 4)),
    )
    single = rows[:, 3] < 0
    above = rows[:, 6] == RELATIONS.index("above")
    cx = torch.where(above[:, None], across, along)
    cy = torch.where(above[:, None], along, across)
    cx[single, 0] = (one_lo + u[:, 7] * (one_hi - one_lo))[single]
    cy[single, 0] = (one_lo + u[:, 8] * (one_hi - one_lo))[single]
    return cx, cy


def _sdf(shape: Tensor, px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Signed distance (B, H, W) in pixels to each row's shape of radius r (B, 1, 1), centred at px = py = 0."""
    ax, ay = px.abs(), py.abs()
    circle = torch.sqrt(px**2 + py**2) - r
    square = _box(ax, ay, 0.82 * r, 0.82 * r)
    # isosceles triangle, apex up at -r, base at 0.8 r, width 2 r
    side = (1.8 * ax - py - r) / (1.8**2 + 1) ** 0.5
    triangle = torch.maximum(side, py - 0.8 * r)
    w = 0.36 * r
    cross = torch.minimum(_box(ax, ay, r, w), _box(ax, ay, w, r))
    stacked = torch.stack(torch.broadcast_tensors(circle, square, triangle, cross), 0)  # (4, B, H, W)
    return stacked.gather(0, shape[None, :, None, None].expand(1, -1, SIZE, SIZE)).squeeze(0)


def _box(ax: Tensor, ay: Tensor, hx: Tensor, hy: Tensor) -> Tensor:
    qx, qy = ax - hx, ay - hy
    outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
    return outside + torch.maximum(qx, qy).clamp_max(0)


def dataset(split: str, n: int, seed: int = 0) -> tuple[Tensor, list[str], Tensor]:
    """(images (N, 3, 32, 32) float32 in [-1, 1], captions, labels (N, 8) long) of ``n`` scenes of ``split``."""
    sc = scenes(split, n, seed)
    return render(sc, seed), [caption(s) for s in sc], labels(sc)


def write_prompts(path: str | Path, split: str, n: int, seed: int = 0) -> list[str]:
    """Write ``n`` distinct captions of ``split`` as a prompt file (``.txt``, ``.csv`` or ``.jsonl``, by suffix,
    as :meth:`fewstep.conditions.PromptSet.read` reads them), atomically; the captions written."""
    p = Path(path)
    if p.suffix not in (".txt", ".csv", ".jsonl"):
        raise FewstepError(f"prompt file {p}: give a .txt, .csv or .jsonl name")
    texts = distinct_captions(split, n, seed)
    if p.suffix == ".csv":
        body = "prompt\n" + "".join(f"{t}\n" for t in texts)
    elif p.suffix == ".jsonl":
        body = "".join(json.dumps({"prompt": t}) + "\n" for t in texts)
    else:
        body = "".join(f"{t}\n" for t in texts)
    write_text(p, body)
    return texts


def distinct_captions(split: str, n: int, seed: int = 0) -> list[str]:
    """The first ``n`` distinct captions of ``split``'s scenes drawn from ``seed``."""
    out: dict[str, None] = {}
    m = max(2 * n, 64)
    while len(out) < n:
        out = dict.fromkeys(caption(s) for s in scenes(split, m, seed))
        if m > 64 * max(n, 1):
            raise FewstepError(f"split {split!r} does not hold {n} distinct captions")
        m *= 2
    return list(out)[:n]


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELDOUT_PAIRS",
    "LABELS",
    "NUM_CLASSES",
    "RELATIONS",
    "SHAPE",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "WORDS",
    "VERSION",
    "Scene",
    "SceneObject",
    "caption",
    "dataset",
    "distinct_captions",
    "labels",
    "parse_caption",
    "render",
    "scene_of",
    "scenes",
    "vocabulary",
    "write_prompts",
]
