"""The tiny text encoders of the scenes pipelines: real ``transformers`` tokenizers and encoders, frozen, from a seed.

Every caption word (:func:`fewstep.zoo.scenes.data.vocabulary`) is one token of each tokenizer:

* CLIP-style: a ``CLIPTokenizer`` (byte-level BPE, lower-cases) over the characters of the words, with merges
  that build each word into one ``word</w>`` token (:func:`word_merges`), ``<|startoftext|>`` and
  ``<|endoftext|>`` as the last two ids (end = padding, as in CLIP); and a ``CLIPTextModel`` (SD, Flux) or
  ``CLIPTextModelWithProjection`` (SD3).
* T5-style: a ``T5Tokenizer`` (Unigram; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then one ``▁word`` piece per word;
  case-sensitive, as T5 is) and a ``T5EncoderModel`` (v1.1 style: gated GELU, untied embeddings).

The encoders keep their seeded random initialisation: they are never trained, the denoisers learn to read them.
A word outside the vocabulary would become an unknown token silently, so prompts are checked first
(:func:`check_prompt`). The sizes each family needs (:data:`FAMILIES`) keep SD3's relations: T5's width holds both
CLIP widths side by side (the pipeline zero-pads the CLIP states to it) and the pooled vector is both projections.

Folders: :func:`write_clip` / :func:`write_t5` write ``tokenizer{suffix}/`` and ``text_encoder{suffix}/`` with
``save_pretrained`` (each folder atomically), which ``from_pretrained`` and diffusers pipelines load unmodified.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import FewstepError
from ...io import atomic_dir

#: tokens each tokenizer reads (start and end included): the longest caption (14 words) fits with room to spare
TEXT_LEN = 20
#: the most words a prompt may hold (CLIP spends two tokens on start and end, T5 one on end)
MAX_WORDS = TEXT_LEN - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_EOW = "</w>"


@dataclass(frozen=True)
class ClipSize:
    """A CLIP text encoder: ``projection`` None gives a ``CLIPTextModel``, a width a ``...WithProjection``."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    projection: int | None = None
    act: str = "quick_gelu"


@dataclass(frozen=True)
class T5Size:
    """A T5 encoder of width ``d_model`` (``heads`` x ``d_model // heads``, feed-forward ``2 d_model``)."""

    d_model: int = 128
    layers: int = 2
    heads: int = 4


#: per family, its text components in the pipeline's order: (suffix of tokenizer/text_encoder, size)
FAMILIES: dict[str, tuple[tuple[str, ClipSize | T5Size], ...]] = {
    "sd": (("", ClipSize(hidden=64)),),
    "sd3": (
        ("", ClipSize(hidden=32, projection=32)),
        ("_2", ClipSize(hidden=64, projection=64, act="gelu")),
        ("_3", T5Size(d_model=128)),
    ),
    "pixart": (("", T5Size(d_model=128)),),
    "flux": (("", ClipSize(hidden=64)), ("_2", T5Size(d_model=128))),
}


def family_dims(family: str) -> dict[str, int]:
    """The denoiser config widths a family's text encoders fix (e.g. sd3: joint_attention_dim 128,
    pooled_projection_dim 96; sd: cross_attention_dim 64; pixart: caption_channels 128)."""
    parts = [size for _, size in _family(family)]
    if family == "sd":
        return {"cross_attention_dim": _clip(parts[0]).hidden}
    if family == "pixart":
        return {"caption_channels": _t5(parts[0]).d_model}
    if family == "flux":
        return {"pooled_projection_dim": _clip(parts[0]).hidden, "joint_attention_dim": _t5(parts[1]).d_model}
    l_, g_, t5 = _clip(parts[0]), _clip(parts[1]), _t5(parts[2])
    return {
        "joint_attention_dim": t5.d_model,
        "pooled_projection_dim": int(l_.projection or l_.hidden) + int(g_.projection or g_.hidden),
    }


def _family(family: str) -> tuple[tuple[str, ClipSize | T5Size], ...]:
    if family not in FAMILIES:
        raise FewstepError(f"no scenes text encoders for family {family!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _clip(size: ClipSize | T5Size) -> ClipSize:
    assert isinstance(size, ClipSize)  # FAMILIES lists CLIP sizes in these places
    return size


def _t5(size: ClipSize | T5Size) -> T5Size:
    assert isinstance(size, T5Size)  # FAMILIES lists T5 sizes in these places
    return size


# ----------------------------------------------------------------------------- vocabulary and prompt checks
def caption_words() -> list[str]:
    """The scenes vocabulary: every caption word, in the data set's order."""
    from .data import vocabulary

    return list(vocabulary())


def _split(prompt: str) -> list[str]:
    """The words of ``prompt`` as the tokenizers see them: whitespace-separated, punctuation and digits apart."""
    return re.findall(r"[^\W\d_]+|[\d_]+|[^\w\s]+", prompt)


def unknown_words(prompt: str, vocabulary: Sequence[str] | None = None) -> list[str]:
    """The words of ``prompt`` the tiny tokenizers cannot encode (each once, in order; case-sensitive)."""
    known = set(caption_words() if vocabulary is None else vocabulary)
    return list(dict.fromkeys(w for w in _split(str(prompt)) if w not in known))


def check_prompt(prompt: str, vocabulary: Sequence[str] | None = None, max_words: int = MAX_WORDS) -> None:
    """Raise FewstepError (one line) if ``prompt`` holds a word outside the vocabulary or more than ``max_words``."""
    words = caption_words() if vocabulary is None else list(vocabulary)
    bad = unknown_words(prompt, words)
    if bad:
        names = ", ".join(repr(w) for w in bad)
        verb = "is" if len(bad) == 1 else "are"
        hint = "; its words are lower case" if any(w.lower() in words for w in bad) else ""
        raise FewstepError(
            f"prompt {prompt!r}: {names} {verb} not in this model's vocabulary (it knows: {', '.join(words)}){hint}; "
            "use the words of its prompt files"
        )
    n = len(_split(str(prompt)))
    if n > max_words:
        raise FewstepError(
            f"prompt {prompt!r} has {n} words; this model's text encoders read at most {max_words}: shorten it"
        )


# ----------------------------------------------------------------------------- tokenizers
def word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which each of ``words`` encodes to the one symbol ``word</w>``.

    Words are taken in sorted order; while BPE with the merges so far leaves a word in pieces, the merge of its
    first two pieces is appended. A merge appended last never fires inside a word that already ends as one
    symbol (every step there had a better-ranked pair), so no word is undone by a later one.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in sorted(set(words)):
        while len(pieces := _bpe(w, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
    return merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """``word`` split as BPE with merge ``ranks`` splits it (the last symbol carries ``</w>``)."""
    s = [*word[:-1], word[-1] + _EOW]
    while len(s) > 1:
        rank, i = min((ranks.get((s[k], s[k + 1]), len(ranks)), k) for k in range(len(s) - 1))
        if rank == len(ranks):
            break
        s[i : i + 2] = [s[i] + s[i + 1]]
    return s


def clip_vocab(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the CLIP tokenizer: characters (alone and word-final), merged pieces, start, end."""
    merges = word_merges(words)
    chars = sorted({c for w in words for c in w})
    tokens = [*chars, *(c + _EOW for c in chars), *(a + b for a, b in merges), BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def clip_tokenizer(words: Sequence[str] | None = None, max_length: int = TEXT_LEN) -> Any:
    """A ``CLIPTokenizer`` in which each of ``words`` (default: the caption words) is one token."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(_words(words))
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=EOS, model_max_length=max_length)


def t5_tokenizer(words: Sequence[str] | None = None, max_length: int = TEXT_LEN) -> Any:
    """A ``T5Tokenizer`` (Unigram) with one piece ``▁word`` per word of ``words`` (default: the caption words)."""
    from transformers import T5Tokenizer

    pieces = [(s, 0.0) for s in T5_SPECIALS] + [("▁" + w, -1.0) for w in _words(words)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _words(words: Sequence[str] | None) -> list[str]:
    out = list(dict.fromkeys(caption_words() if words is None else words))
    bad = [w for w in out if not re.fullmatch(r"[a-z]+", w)]
    if bad or not out:
        raise FewstepError(f"tokenizer words must be lower-case letters only; got {bad or 'none'}")
    return out


# ----------------------------------------------------------------------------- encoders
def clip_encoder(tokenizer: Any, seed: int, size: ClipSize = ClipSize()) -> Any:
    """A frozen ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) for ``tokenizer``, initialised from ``seed``.

    Its last hidden states are (B, L, hidden); the projection model's ``text_embeds`` are (B, projection).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=size.projection or size.hidden,
        hidden_act=size.act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModel if size.projection is None else CLIPTextModelWithProjection
    return _seeded(lambda: cls(cfg), seed)


def t5_encoder(tokenizer: Any, seed: int, size: T5Size = T5Size()) -> Any:
    """A frozen ``T5EncoderModel`` for ``tokenizer``, initialised from ``seed``; hidden states (B, L, d_model)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=size.d_model,
        d_kv=size.d_model // size.heads,
        d_ff=2 * size.d_model,
        num_layers=size.layers,
        num_heads=size.heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=2 * TEXT_LEN,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _seeded(lambda: T5EncoderModel(cfg), seed)


def _seeded(make: Any, seed: int) -> Any:
    """``make()`` under ``torch.manual_seed(seed)`` in a forked RNG (the caller's RNG is untouched), frozen, eval."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = make()
    return model.eval().requires_grad_(False)


def text_components(family: str, seed: int = 0) -> dict[str, Any]:
    """The tokenizers and encoders of ``family``'s pipeline by their pipeline names (``tokenizer``,
    ``text_encoder``, ``tokenizer_2``, ...), encoder k seeded ``seed + k``."""
    out: dict[str, Any] = {}
    for k, (suffix, size) in enumerate(_family(family)):
        if isinstance(size, ClipSize):
            tok = clip_tokenizer()
            out[f"tokenizer{suffix}"], out[f"text_encoder{suffix}"] = tok, clip_encoder(tok, seed + k, size)
        else:
            tok = t5_tokenizer()
            out[f"tokenizer{suffix}"], out[f"text_encoder{suffix}"] = tok, t5_encoder(tok, seed + k, size)
    return out


# ----------------------------------------------------------------------------- folders
def write_clip(
    folder: str | os.PathLike, seed: int, size: ClipSize = ClipSize(), suffix: str = ""
) -> tuple[Path, Path]:
    """Write ``tokenizer{suffix}/`` and ``text_encoder{suffix}/`` (CLIP) under ``folder``; returns both paths.

    The tokenizer folder also holds ``vocab.json`` and ``merges.txt``, the files CLIP tokenizers are read from.
    """
    tok = clip_tokenizer()
    vocab, merges = clip_vocab(caption_words())
    tdir = _save(
        tok, Path(folder) / f"tokenizer{suffix}", {"vocab.json": json.dumps(vocab), "merges.txt": _merges_txt(merges)}
    )
    edir = _save(clip_encoder(tok, seed, size), Path(folder) / f"text_encoder{suffix}")
    return tdir, edir


def write_t5(folder: str | os.PathLike, seed: int, size: T5Size = T5Size(), suffix: str = "") -> tuple[Path, Path]:
    """Write ``tokenizer{suffix}/`` and ``text_encoder{suffix}/`` (T5) under ``folder``; returns both paths."""
    tok = t5_tokenizer()
    tdir = _save(tok, Path(folder) / f"tokenizer{suffix}")
    edir = _save(t5_encoder(tok, seed, size), Path(folder) / f"text_encoder{suffix}")
    return tdir, edir


def write_text_encoders(folder: str | os.PathLike, family: str, seed: int = 0) -> dict[str, int]:
    """Write ``family``'s tokenizers and encoders under ``folder`` (as :func:`text_components` builds them);
    returns :func:`family_dims`."""
    for k, (suffix, size) in enumerate(_family(family)):
        if isinstance(size, ClipSize):
            write_clip(folder, seed + k, size, suffix)
        else:
            write_t5(folder, seed + k, size, suffix)
    return family_dims(family)


def _merges_txt(merges: Sequence[tuple[str, str]]) -> str:
    return "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)


def _save(obj: Any, path: Path, extra: dict[str, str] | None = None) -> Path:
    """``obj.save_pretrained`` into ``path`` (atomically), plus ``extra`` files {name: text}."""
    with atomic_dir(path) as tmp:
        if hasattr(obj, "config"):
            obj.save_pretrained(tmp, safe_serialization=True)
        else:
            obj.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- measuring
def parameter_count(model: Any) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def encode(tokenizer: Any, encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden states (B, TEXT_LEN, width) of ``prompts``, padded to the tokenizer's length, as pipelines do."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids).last_hidden_state


def seconds_per_prompt(tokenizer: Any, encoder: Any, prompts: Sequence[str], repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of encoding ``prompts`` one at a time, per prompt (tokenizing included)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in prompts:
            encode(tokenizer, encoder, [p])
        best = min(best, (time.perf_counter() - t0) / max(1, len(prompts)))
    return best
