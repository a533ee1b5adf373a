"""Prompts a pipeline's tokenizers cannot encode are refused in one line that names the words (issue 22)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import tiny_pipelines as T  # noqa: E402
from fewstep.errors import FewstepError  # noqa: E402
from fewstep.integrations.load import load_diffusers  # noqa: E402
from fewstep.integrations.pipelines import load_pipeline  # noqa: E402


def test_a_word_the_t5_tokenizer_maps_to_its_unknown_token_is_named(tmp_path):
    """The tiny T5 tokenizer spells unknown lower-case words in pieces but has no 'é': it would become <unk>."""
    pipe = T.build("pixart_sigma")
    good = T.PROMPTS["pixart_sigma"][0]
    model = load_pipeline(pipe, prompts=[good], cache_dir=tmp_path)
    assert model.cond_for([0])  # the tiny vocabulary's own prompt encodes
    with pytest.raises(FewstepError) as e:
        load_pipeline(pipe, prompts=[good, "a café on the road"], cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "'café'" in msg and "'road'" not in msg and "a café on the road" in msg


def test_a_folder_that_lists_its_vocabulary_refuses_other_words(tmp_path):
    """CLIP's byte-level BPE encodes any word (as pieces), so a folder may say which words its model knows."""
    folder = T.save_pipeline("sd", tmp_path / "sd")
    words = sorted({w for p in T.PROMPTS["sd"] for w in p.split()})
    (folder / "fewstep.json").write_text(json.dumps({"vocabulary": words}))
    model = load_diffusers(folder, prompts=list(T.PROMPTS["sd"]), cache_dir=tmp_path)
    assert len(model.cond_for(range(4))) > 0
    unseen = next(w for w in T.WORDS if w not in words)
    with pytest.raises(FewstepError, match=f"'{unseen}' cannot be encoded.*it knows: {words[0]}"):
        load_diffusers(folder, prompts=[f"a {unseen}"], cache_dir=tmp_path)
    (folder / "fewstep.json").write_text(json.dumps({"vocabulary": "cat dog"}))
    with pytest.raises(FewstepError, match="vocabulary must be a non-empty list of words"):
        load_diffusers(folder, prompts=list(T.PROMPTS["sd"]), cache_dir=tmp_path)
