"""The scenes pipelines' tiny text encoders: every caption word is one known token, encoders are fixed by their
seed and load back from their folders, and a prompt outside the vocabulary is refused in one line."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("transformers")

from fewstep.errors import FewstepError  # noqa: E402 - after the offline switch
from fewstep.zoo.scenes import text as T  # noqa: E402
from fewstep.zoo.scenes.data import distinct_captions, vocabulary  # noqa: E402

LONGEST = "a small yellow triangle left of a large purple square on a white background"


@pytest.fixture(scope="module")
def tokenizers():
    return {"clip": T.clip_tokenizer(), "t5": T.t5_tokenizer()}


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_every_caption_word_is_one_known_token(tokenizers, kind):
    tok = tokenizers[kind]
    ids = {}
    for w in vocabulary():
        got = tok(w, add_special_tokens=False).input_ids
        assert len(got) == 1, (w, got)
        assert got[0] != tok.unk_token_id and got[0] not in tok.all_special_ids
        assert tok.decode(got).strip() == w
        ids[w] = got[0]
    assert len(set(ids.values())) == len(ids)  # distinct words, distinct ids
    # a caption is its words' ids between the special tokens, padded to TEXT_LEN
    words = LONGEST.split()
    out = tok(LONGEST, padding="max_length", max_length=T.TEXT_LEN).input_ids
    body = [ids[w] for w in words]
    if kind == "clip":
        assert out == [tok.bos_token_id, *body] + [tok.eos_token_id] * (T.TEXT_LEN - 1 - len(words))
    else:
        assert out == [*body, tok.eos_token_id] + [tok.pad_token_id] * (T.TEXT_LEN - 1 - len(words))


def test_every_caption_fits_and_passes_the_check():
    caps = distinct_captions("all", 300, seed=0) + distinct_captions("heldout", 50, seed=1)
    assert max(len(c.split()) for c in caps) <= T.MAX_WORDS
    for c in caps:
        T.check_prompt(c)
    T.check_prompt("")  # the empty prompt (classifier-free guidance's negative) is fine


def test_check_prompt_names_the_words_it_cannot_encode():
    assert T.unknown_words("a purple star on a pink background, twice") == ["star", "pink", ",", "twice"]
    with pytest.raises(FewstepError) as e:
        T.check_prompt("a purple star near a pink star")
    msg = str(e.value)
    assert "\n" not in msg
    assert "'star', 'near', 'pink' are not in this model's vocabulary" in msg
    assert "it knows: " + ", ".join(vocabulary()) in msg and "prompt files" in msg
    with pytest.raises(FewstepError, match=r"'A', 'Red' are not .*its words are lower case"):
        T.check_prompt("A Red circle")
    with pytest.raises(FewstepError, match=f"has {T.MAX_WORDS + 1} words.*at most {T.MAX_WORDS}"):
        T.check_prompt(" ".join(["a"] * (T.MAX_WORDS + 1)))


def test_word_merges_build_every_word_whole():
    words = ["ab", "abc", "b", "bc", "cab", "abcabc"]  # overlapping prefixes and suffixes
    merges = T.word_merges(words)
    ranks = {m: k for k, m in enumerate(merges)}
    for w in words:
        assert T._bpe(w, ranks) == [w + "</w>"]


def _states(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_encoders_are_fixed_by_their_seed(tokenizers, kind):
    tok = tokenizers[kind]
    build = T.clip_encoder if kind == "clip" else T.t5_encoder
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = _states(build(tok, 5)), _states(build(tok, 5)), _states(build(tok, 6))
    assert torch.equal(torch.rand(3), before)  # the caller's RNG is untouched
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    drawn = [k for k in a if a[k].dtype.is_floating_point and a[k].std() > 0]  # not the constant biases and norms
    assert len(drawn) >= 10 and all(not torch.equal(a[k], c[k]) for k in drawn)


def test_encoders_tell_captions_apart():
    comps = T.text_components("sd", seed=0)
    caps = ["a red circle", "a blue circle", "a red square", "a red circle on a grey background"]
    h = T.encode(comps["tokenizer"], comps["text_encoder"], caps)
    assert h.shape == (4, T.TEXT_LEN, T.family_dims("sd")["cross_attention_dim"])
    for k in range(1, 4):  # one word changed moves the states by far more than rounding
        assert (h[0] - h[k]).norm() / h[0].norm() > 0.05


def test_sd3_widths_follow_the_pipeline(tmp_path):
    """SD3 zero-pads the two CLIP states to T5's width and concatenates the two pooled projections."""
    dims = T.family_dims("sd3")
    (_, l_), (_, g_), (_, t5) = T.FAMILIES["sd3"]
    assert isinstance(l_, T.ClipSize) and isinstance(g_, T.ClipSize) and isinstance(t5, T.T5Size)
    assert l_.hidden + g_.hidden <= t5.d_model == dims["joint_attention_dim"]
    assert l_.hidden < g_.hidden  # CLIP-L narrower than CLIP-G, as in SD3
    comps = T.text_components("sd3", seed=0)
    ids = comps["tokenizer"](["a red circle"], padding="max_length", return_tensors="pt").input_ids
    pooled = [comps[f"text_encoder{s}"](ids).text_embeds.shape[-1] for s in ("", "_2")]
    assert sum(pooled) == dims["pooled_projection_dim"]


def test_written_folders_load_unmodified(tmp_path):
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5Tokenizer,
    )

    dims = T.write_text_encoders(tmp_path, "sd3", seed=3)
    assert dims == T.family_dims("sd3")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    mem = T.text_components("sd3", seed=3)
    caps = distinct_captions("heldout", 4, seed=0)
    for s, tcls, ecls in (("_2", CLIPTokenizer, CLIPTextModelWithProjection), ("_3", T5Tokenizer, T5EncoderModel)):
        tok = tcls.from_pretrained(tmp_path / f"tokenizer{s}", local_files_only=True)
        enc = ecls.from_pretrained(tmp_path / f"text_encoder{s}", local_files_only=True)
        assert tok(caps).input_ids == mem[f"tokenizer{s}"](caps).input_ids
        assert torch.equal(T.encode(tok, enc, caps), T.encode(mem[f"tokenizer{s}"], mem[f"text_encoder{s}"], caps))
    # the CLIP vocab.json + merges.txt alone give the same tokenizer
    (tmp_path / "tokenizer" / "tokenizer.json").unlink()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)
    assert tok(caps).input_ids == mem["tokenizer"](caps).input_ids


def test_unknown_family_is_one_line():
    with pytest.raises(FewstepError, match="no scenes text encoders for family 'sdxl'; valid: sd, sd3, pixart, flux"):
        T.family_dims("sdxl")
