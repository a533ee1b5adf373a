"""Metrics beyond RMSE: known answers for FD / KID / SWD / PSNR / log-likelihood, the digits feature
classifier (accuracy, determinism, cache), and evaluate(..., metrics=...) on zoo models."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from fewstep import zoo
from fewstep.errors import FewstepError, ShapeError
from fewstep.evaluate import evaluate, format_table
from fewstep.metrics import (
    average_log_likelihood,
    frechet_distance,
    kernel_distance,
    projection_directions,
    psnr,
    sliced_wasserstein,
    wasserstein2_sq_1d,
)
from fewstep.metrics import classifier as clf
from fewstep.metrics.features import digits_features
from gauss import make_gauss

F64 = torch.float64
torch.set_num_threads(1)


def _gauss(n: int, mean: torch.Tensor, chol: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + torch.randn(n, mean.numel(), generator=g, dtype=F64) @ chol.T


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T


def _fd_closed_form(m1, s1, m2, s2) -> float:
    r = _psd_sqrt(s1)
    cross = torch.linalg.eigvalsh(r @ s2 @ r).clamp(min=0).sqrt().sum()
    return float(((m1 - m2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


# ----------------------------------------------------------------------------- Frechet distance, KID
@pytest.mark.parametrize("feature", [None, "linear"])
def test_frechet_distance_of_two_gaussians_is_the_closed_form(feature):
    n = 20_000
    m1, m2 = torch.tensor([1.0, 0.0, -0.5], dtype=F64), torch.tensor([0.0, 0.5, 0.0], dtype=F64)
    l1 = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.5, 0.0], [0.0, 0.2, 0.8]], dtype=F64)
    l2 = torch.diag(torch.tensor([0.7, 1.2, 0.4], dtype=F64))
    x, y = _gauss(n, m1, l1, 1), _gauss(n, m2, l2, 2)
    s1, s2 = l1 @ l1.T, l2 @ l2.T
    a = torch.eye(3, dtype=F64)
    net = None
    if feature == "linear":  # a user feature network: features A x ~ N(A m, A S A^T)
        a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
        net = torch.nn.Linear(3, 2, bias=False).double()
        net.weight.data.copy_(a)
    m1, m2, s1, s2 = a @ m1, a @ m2, a @ s1 @ a.T, a @ s2 @ a.T
    exact = _fd_closed_form(m1, s1, m2, s2)
    # tolerance from theory: the mean term's bias tr(S1 + S2) / n and 5 x its std 2 sqrt(d^T (S1 + S2) d / n);
    # the covariance term's first-order error scales with ||S1 - S2|| and the covariance estimates'
    # relative error sqrt(2 / n): 5 x that
    d = m1 - m2
    tol = (
        float(torch.trace(s1 + s2)) / n
        + 10 * math.sqrt(float(d @ (s1 + s2) @ d) / n)
        + 5 * float(torch.linalg.matrix_norm(s1 - s2)) * math.sqrt(2 / n)
    )
    fd = frechet_distance(x, y, net)
    assert abs(fd - exact) < tol, (fd, exact, tol)
    assert tol < 0.12 * exact


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = _gauss(500, torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64), 3)
    assert abs(frechet_distance(x, x)) < 1e-8
    with pytest.raises(FewstepError, match="at least 2 samples"):
        frechet_distance(x[:1], x)


def _poly_mmd_unbiased(fx: torch.Tensor, fy: torch.Tensor) -> float:
    d = fx.shape[1]
    m = fx.shape[0]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    def off(kk):  # the mean of the off-diagonal entries
        return (kk.sum() - kk.diagonal().sum()) / (m * (m - 1))

    kxx, kyy, kxy = k(fx, fx), k(fy, fy), k(fx, fy)
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_is_unbiased_near_zero_for_one_distribution_and_matches_the_direct_formula():
    mean, chol = torch.tensor([0.5, -0.5], dtype=F64), torch.tensor([[1.0, 0.0], [0.4, 0.6]], dtype=F64)
    x, y = _gauss(1000, mean, chol, 4), _gauss(1000, mean, chol, 5)
    same, same_std = kernel_distance(x, y, subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    shifted, _ = kernel_distance(x + torch.tensor([1.0, 0.0], dtype=F64), y, subsets=20, subset_size=500)
    assert shifted > 50 * max(abs(same), same_std)
    # one subset holding every sample: the unbiased MMD^2 of the full sets, computed directly
    full, _ = kernel_distance(x[:300], y[:300], subsets=1, subset_size=300)
    assert full == pytest.approx(_poly_mmd_unbiased(y[:300], x[:300]), rel=1e-9, abs=1e-12)
    # seeded subsets: the same figure twice, global RNG untouched
    state = torch.random.get_rng_state()
    assert kernel_distance(x, y, subsets=5, subset_size=100) == kernel_distance(x, y, subsets=5, subset_size=100)
    assert torch.equal(state, torch.random.get_rng_state())


# ----------------------------------------------------------------------------- sliced Wasserstein
def test_sliced_wasserstein_known_values():
    x1 = _gauss(300, torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64), 6)
    assert sliced_wasserstein(x1, x1) == 0.0
    assert sliced_wasserstein(x1, x1 + 0.7) == pytest.approx(0.7, abs=1e-12)  # 1-D: the exact W2 of a shift
    x2 = _gauss(400, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), 7)
    s = torch.tensor([1.0, -0.5], dtype=F64)
    th = projection_directions(2, 256, seed=0)
    exact = float(((th @ s) ** 2).mean().sqrt())  # each projection is shifted by theta.s
    assert sliced_wasserstein(x2, x2 + s) == pytest.approx(exact, rel=1e-12)
    assert exact == pytest.approx(float(s.norm()) / math.sqrt(2), rel=0.1)  # E (theta.s)^2 = |s|^2 / d


def test_wasserstein_1d_unequal_counts_is_exact():
    u, v = torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([[0.0, 0.5, 1.0]], dtype=F64)
    assert float(wasserstein2_sq_1d(u, v)) == pytest.approx(1 / 12, abs=1e-15)  # by hand from the quantiles
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64) + 0.3
    # repeating every point of a 5 times and of b 7 times gives equal counts with the same measures
    ar, br = a.repeat_interleave(5, -1), b.repeat_interleave(7, -1)
    direct = ((ar.sort(-1).values - br.sort(-1).values) ** 2).mean(-1)
    assert torch.allclose(wasserstein2_sq_1d(a, b), direct, rtol=1e-12, atol=1e-14)


def test_sliced_wasserstein_grows_with_a_shift():
    mean, chol = torch.zeros(2, dtype=F64), torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64)
    x, y = _gauss(500, mean, chol, 9), _gauss(800, mean, chol, 10)
    s = torch.tensor([0.6, 0.8], dtype=F64)
    d = [sliced_wasserstein(x, y + c * s) for c in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in itertools.pairwise(d)), d
    assert d[0] < 0.2  # two finite samples of one distribution: small, not zero


# ----------------------------------------------------------------------------- PSNR, log-likelihood
def test_psnr_known_values():
    ref = torch.zeros(3, 1, 4, 4)
    x = ref + torch.tensor([0.02, 0.2, 0.0])[:, None, None, None]
    p = psnr(x, ref)  # data range 2: 10 log10(4 / e^2)
    assert p[0].item() == pytest.approx(40.0, abs=1e-5) and p[1].item() == pytest.approx(20.0, abs=1e-5)
    assert math.isinf(p[2].item())
    assert psnr(x[:1], ref[:1], data_range=1.0).item() == pytest.approx(40.0 - 20 * math.log10(2), abs=1e-5)
    with pytest.raises(ShapeError):
        psnr(x, ref[:2])


def test_log_likelihood_matches_the_gmm2d_density():
    import numpy
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    den = zoo.load("gmm2d")
    x = den.sample_data(400, generator=torch.Generator().manual_seed(11))
    net = den.net
    comps = numpy.stack(
        [
            multivariate_normal(m.numpy(), float(s) ** 2 * numpy.eye(2)).logpdf(x.numpy())
            for m, s in zip(net.means, net.stds, strict=True)
        ]
    )
    ref = logsumexp(comps, axis=0) - math.log(len(comps))
    mean, sem = average_log_likelihood(den.log_prob, x)
    assert mean == pytest.approx(float(ref.mean()), rel=1e-8)
    assert mean == pytest.approx(float(den.log_prob(x).mean()), rel=1e-12) and 0 < sem < 0.1
    # conditional samples are scored under their own component
    lab = torch.full((400,), 3)
    cond_mean, _ = average_log_likelihood(den.log_prob, x, {"class_labels": lab})
    assert cond_mean == pytest.approx(float(comps[3].mean()), rel=1e-8)


# ----------------------------------------------------------------------------- digits classifier
def test_digits_classifier_accuracy_on_held_out_digits():
    from fewstep.zoo import digits_data

    net = clf.load_digits_classifier()
    x, y = digits_data()
    _, te = clf.heldout_split(clf.RECIPE, x.shape[0])
    acc = clf.accuracy(net, x[te], y[te])
    assert acc > 0.95 and len(te) == 359
    assert float(net.heldout_accuracy) == pytest.approx(acc)
    # the feature map serves upsampled digits: nearest x2 pools back exactly, bilinear x4 closely
    f = digits_features()
    f8 = f(x[:64])
    assert f8.shape == (64, 64) and f8.dtype == F64
    assert torch.allclose(f(x[:64].repeat_interleave(2, -1).repeat_interleave(2, -2)), f8, atol=1e-5)
    up = torch.nn.functional.interpolate(x[:64], size=(32, 32), mode="bilinear", align_corners=False)
    assert (net(torch.nn.functional.avg_pool2d(up, 4)).argmax(-1) == y[:64]).double().mean() > 0.9
    with pytest.raises(ShapeError, match="8, 16, 32"):
        f(torch.zeros(2, 1, 12, 12))


def test_digits_classifier_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    recipe = clf.recipe_for(steps=40)
    a, b = clf.train_classifier(recipe), clf.train_classifier(recipe)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = clf.train_classifier(clf.recipe_for(steps=40, seed=1))
    assert not torch.equal(a["head.weight"], other["head.weight"])
    net = clf.load_digits_classifier(steps=40)  # trains and writes the cache file
    path = clf.classifier_path(recipe)
    assert path.exists() and not list(tmp_path.rglob("*.tmp"))
    clf._MEMORY.clear()

    def no_training(_):
        raise AssertionError("read from the cache, not trained")

    monkeypatch.setattr(clf, "train_classifier", no_training)
    again = clf.load_digits_classifier(steps=40)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, a[k]) for k, v in again.state_dict().items())


# ----------------------------------------------------------------------------- evaluate(metrics=...)
def _by(rep, solver, nfe):
    return next(r for r in rep["results"] if r["solver"] == solver and r["nfe"] == nfe)


def test_evaluate_metrics_on_gmm2d():
    den = zoo.load("gmm2d")
    rep = evaluate(den, nfe=[3, 10], solvers=["ddim@logsnr"], samples=128, metrics="auto", reference_nfe=100).as_dict()
    json.dumps(rep, allow_nan=False)
    assert rep["metrics"]["names"] == ["swd", "loglik"]
    ref_row = rep["results"][0]
    assert ref_row["role"] == "reference" and ref_row["solver"] == "reference" and ref_row["nfe"] == 200
    assert ref_row["rmse"] == rep["reference"]["self_error"]
    for r in rep["results"]:
        assert {"fd", "kid", "kid_std", "psnr", "swd", "loglik"} <= set(r)
        assert r["fd"] is None and r["psnr"] is None and r["swd"] > 0
    few, many = _by(rep, "ddim", 3), _by(rep, "ddim", 10)
    assert few["swd"] > many["swd"] > ref_row["swd"] * 0.9 and few["swd"] > 2 * ref_row["swd"]
    # samples of the converged solve score like the data under the exact density
    data_ll = rep["metrics"]["data_reference"]["loglik"]
    assert abs(ref_row["loglik"] - data_ll) < 0.3 and few["loglik"] < data_ll - 5
    assert abs(many["loglik"] - data_ll) < abs(few["loglik"] - data_ll)
    table = format_table(rep)
    assert "SWD" in table and "loglik" in table and table.splitlines()[4].startswith("reference")


def test_evaluate_metrics_on_digits_empirical():
    den = zoo.load("digits-empirical")
    rep = evaluate(den, nfe=[3, 10], solvers=["dpmpp_2m@time"], samples=96, metrics="auto", reference_nfe=100).as_dict()
    json.dumps(rep, allow_nan=False)
    assert rep["metrics"]["names"] == ["fd", "kid", "psnr"] and rep["metrics"]["feature"] == "digits-classifier"
    assert rep["metrics"]["data_reference"]["n"] == 1797
    ref_row, few, many = rep["results"][0], _by(rep, "dpmpp_2m", 3), _by(rep, "dpmpp_2m", 10)
    assert ref_row["role"] == "reference" and ref_row["swd"] is None
    assert few["fd"] > 2 * many["fd"] and few["fd"] > 2 * ref_row["fd"]
    assert few["kid"] > many["kid"] and few["kid"] > ref_row["kid"]
    assert few["psnr"] < many["psnr"] <= ref_row["psnr"] == 100.0  # identical samples: the cap
    assert "FD" in format_table(rep) and "PSNR" in format_table(rep)


def _reference_of(den, n):
    from fewstep.evaluate import reference_samples
    from fewstep.seeds import eval_seeds

    return reference_samples(den, eval_seeds(n))[0]


def test_evaluate_metrics_choices_and_errors():
    den = make_gauss(__import__("fewstep").VPLinear(), "eps", d=3)  # no data, no log_prob
    fast = evaluate(den, nfe=4, solvers=["ddim@logsnr"], samples=16).as_dict()
    assert set(fast) == {"model", "nfe", "samples", "seed", "reference", "results"}
    assert set(fast["results"][0]) == {"solver", "grid", "nfe", "rmse", "rmse_sem", "seconds"}
    rep = evaluate(den, nfe=4, solvers=["ddim@logsnr"], samples=32, metrics=["swd"], data_samples=64).as_dict()
    src = rep["metrics"]["data_reference"]["source"]
    assert src.startswith("reference solve dpmpp_3m@logsnr") and "1000032..1000095" in src
    assert [r["solver"] for r in rep["results"]] == ["reference", "ddim"]
    data = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    user = evaluate(den, nfe=4, solvers=["ddim@logsnr"], samples=16, metrics="swd", data=data).as_dict()
    assert user["metrics"]["data_reference"] == {"source": "user (50 samples)", "n": 50}
    # any user feature network serves FD / KID (here torch's Identity: FD of the raw vectors)
    own = evaluate(
        den,
        nfe=[3, 8],
        solvers=["ddim@logsnr"],
        samples=64,
        metrics=["fd", "kid"],
        data=data,
        feature=torch.nn.Identity(),
    ).as_dict()
    assert own["metrics"]["feature"] == "Identity"
    assert own["results"][0]["fd"] == pytest.approx(frechet_distance(_reference_of(den, 64), data), rel=1e-9)
    assert _by(own, "ddim", 3)["fd"] > _by(own, "ddim", 8)["fd"]
    with pytest.raises(FewstepError, match="unknown metric 'fid'"):
        evaluate(den, nfe=4, solvers=["ddim@logsnr"], samples=8, metrics=["fid"])
    with pytest.raises(FewstepError, match="log_prob"):
        evaluate(den, nfe=4, solvers=["ddim@logsnr"], samples=8, metrics="loglik")
    with pytest.raises(FewstepError, match="feature="):
        evaluate(den, nfe=4, solvers=["ddim@logsnr"], samples=8, metrics="fd")
    with pytest.raises(ShapeError, match="shape"):
        evaluate(den, nfe=4, solvers=["ddim@logsnr"], samples=8, metrics="swd", data=torch.zeros(10, 4))


def test_fd_to_the_reference_solve_needs_no_data():
    # fd_ref: FD to the reference solve's samples from the same seeds; no data set involved
    den = make_gauss(__import__("fewstep").VPLinear(), "eps", d=3)
    rep = evaluate(
        den, nfe=[3, 8], solvers=["ddim@logsnr"], samples=64, metrics=["fd_ref"], feature=torch.nn.Identity()
    ).as_dict()
    assert rep["metrics"]["data_reference"] is None and rep["metrics"]["feature"] == "Identity"
    ref_row, few, many = rep["results"][0], _by(rep, "ddim", 3), _by(rep, "ddim", 8)
    assert few["fd"] is None and few["fd_ref"] > many["fd_ref"] > ref_row["fd_ref"] >= 0
    from fewstep.evaluate import run_solver
    from fewstep.seeds import eval_seeds

    ref = _reference_of(den, 64)
    x = run_solver(den, eval_seeds(64), "ddim@logsnr", 3, ref, keep_samples=True).samples
    assert few["fd_ref"] == pytest.approx(frechet_distance(x, ref), rel=1e-6)
    assert "FD to ref: to the reference solve's samples" in format_table(rep)
    # named only: "auto" leaves it out, and without a feature network it names the fix
    assert (
        "fd_ref"
        not in evaluate(
            zoo.load("gmm2d"), nfe=3, solvers=["ddim@logsnr"], samples=16, metrics="auto", reference_nfe=40
        ).as_dict()["metrics"]["names"]
    )
    with pytest.raises(FewstepError, match="feature="):
        evaluate(den, nfe=4, solvers=["ddim@logsnr"], samples=8, metrics="fd_ref")
