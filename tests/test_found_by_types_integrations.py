"""Bugs the type checker and the linter found in the diffusers integrations (issue 25)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import tiny_pipelines as T  # noqa: E402
from fewstep.errors import FewstepError, ShapeError  # noqa: E402
from fewstep.integrations.pipelines import load_pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

PROMPTS = ["a photo of a cat", "a red car on the road"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return load_pipeline(T.build("sd"), height=16, width=16, cache_dir=tmp_path_factory.mktemp("cache"))


def test_prompt_cond_refuses_fewer_negatives_than_prompts(sd):
    """zip() dropped the prompts past the negatives: two prompts with one negative made one sample's condition."""
    with pytest.raises(FewstepError, match="1 negative prompts for 2 prompts"):
        sd.prompt_cond(PROMPTS, negative=["a black dog in the city"])


def test_prompt_cond_takes_one_negative_per_prompt(sd):
    cond = sd.prompt_cond(PROMPTS, negative=["a black dog in the city", None], guidance=2.0)
    assert cond["prompt"].shape == (2,) and cond["guidance_scale"].shape == (2,)


def test_family_net_refuses_a_negative_flag_per_other_batch(sd):
    """A negative flag vector of another length was cut to the batch by zip(); now one line names it."""
    idx = sd.prompt_cond(PROMPTS)["prompt"]
    x = torch.zeros(2, *sd.sample_shape)
    with pytest.raises(ShapeError, match="negative has 3 entries for a batch of 2"):
        sd.net(x, torch.full((2,), 500.0), prompt=idx, negative=torch.tensor([True, False, True]))
