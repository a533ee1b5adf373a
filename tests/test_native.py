"""The pipeline's own scheduler as an evaluation row: the unmodified pipeline's samples (bit for bit, or to float
rounding where the pipeline orders its batch otherwise) at its NFE."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep.errors import FewstepError  # noqa: E402
from fewstep.evaluate import evaluate  # noqa: E402
from fewstep.integrations.native import OwnScheduler, steps_for  # noqa: E402
from fewstep.specs import load_model  # noqa: E402
from fewstep.zoo.scenes.measure import captions_of  # noqa: E402
from fewstep.zoo.scenes.models import pipeline_folder  # noqa: E402


def _model(family: str):
    heldout = pipeline_folder(family) / "prompts" / "heldout.txt"
    return load_model(f"zoo:scenes-{family}", prompts=str(heldout), guidance=4.0)


@pytest.mark.parametrize(
    ("family", "steps", "extra"),
    [("sd", 4, {}), ("pixart", 5, {"use_resolution_binning": False, "max_sequence_length": 20}), ("sd3", 5, {})],
)
def test_own_scheduler_is_the_pipelines_call(family: str, steps: int, extra: dict) -> None:
    torch.set_num_threads(1)
    m = _model(family)
    seeds = [5, 6]
    assert steps_for(m, 5) == steps  # PNDM's PLMS spends steps + 1 evaluations, DPM-Solver++ one per step
    before = m.nfe
    ours = OwnScheduler(5).samples(m, seeds)
    assert m.nfe - before == 5
    pipe = m.family.pipe
    theirs = pipe(
        prompt=captions_of(m, seeds),
        latents=m.noise(seeds),
        num_inference_steps=steps,
        guidance_scale=4.0,
        output_type="latent",
        height=32,
        width=32,
        **extra,
    ).images
    if family == "sd3":  # its pipeline batches the unconditional half first: the same sums in another order
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    else:
        assert torch.equal(ours, theirs)


def test_own_scheduler_row_in_evaluate() -> None:
    torch.set_num_threads(1)
    m = _model("sd")
    rep = evaluate(m, nfe=5, solvers=["ddim@time"], samples=4, reference_nfe=20, samplers=[OwnScheduler(5)])
    rows = {r.solver: r for r in rep.rows}
    own = rows["pipeline:PNDMScheduler"]
    assert own.nfe == 5 and own.grid == "own" and own.rmse is not None and 0 < own.rmse < 10
    assert rows["ddim"].rmse is not None


def test_not_a_pipeline_is_one_line() -> None:
    m = load_model("zoo:gmm")
    with pytest.raises(FewstepError, match="not a diffusers pipeline"):
        OwnScheduler(5).samples(m, [0])
