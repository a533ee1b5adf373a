"""Denoiser: a network, its schedule, its prediction type and its sample shape, seen as D, E or velocity.

The pieces it is made of live in their own modules: the output conversions (:mod:`fewstep.conversions`), the
guidance around the network call and what the samples are conditioned on (:mod:`fewstep.guidance`), the
fingerprint (:mod:`fewstep.fingerprint`). The Denoiser calls the network (in its precision, counting the
evaluations) and draws each seed's starting noise.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, overload

import torch
from torch import Tensor, nn

from .conditions import ConditionSpec
from .conversions import BASES, check_prediction, to_basis, to_DE, to_DE_fast
from .cost import Cost, counted
from .errors import FewstepError, ModelOutputError
from .fingerprint import fingerprint, pin
from .guidance import Conditions, Guidance
from .schedules import Schedule, TimeScalars

__all__ = ["BASES", "DTYPES", "Denoiser", "check_dtype", "check_finite", "torch_dtype"]
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@overload
def torch_dtype(dtype: None) -> None: ...
@overload
def torch_dtype(dtype: str | torch.dtype) -> torch.dtype: ...
@overload
def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None: ...
def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """fp32 / fp16 / bf16 (or a torch dtype) -> torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise FewstepError(f"dtype {dtype!r} is not one of fp32, fp16, bf16")
    return DTYPES[str(dtype)]


def check_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``dtype`` if a network can run in it on ``device`` (a tiny matmul and convolution are tried), else a
    FewstepError naming the pair and what runs there."""
    dt, dev = torch_dtype(dtype), torch.device(device)
    try:
        a = torch.ones(2, 2, 4, 4, dtype=dt, device=dev)
        torch.nn.functional.conv2d(a, torch.ones(2, 2, 3, 3, dtype=dt, device=dev))
        (a.flatten(1) @ a.flatten(1).T).sum().item()
    except (RuntimeError, TypeError) as e:
        raise FewstepError(
            f"--dtype {dtype}: this device ({dev}) cannot run a network in {dt} ({str(e)[:80]}); use fp32"
        ) from None
    return dt


def _alias(path: str, doc: str) -> Any:
    """A read-write attribute that is ``self.<path>`` (the Denoiser's flat names for its conditions)."""
    owner, _, last = path.rpartition(".")
    get_owner = operator.attrgetter(owner)
    return property(operator.attrgetter(path), lambda self, v: setattr(get_owner(self), last, v), doc=doc)


class Denoiser(nn.Module):
    """Wrap ``net(x, t_net, **cond)`` into the internal form.

    Args:
        net: the network; called as ``net(x, t_net, **cond)`` with x of shape (B, ...) and
            t_net of shape (B,), and must return a tensor shaped like x.
        schedule: the model's :class:`~fewstep.schedules.Schedule`.
        prediction: what the network outputs: ``eps``, ``x0``, ``v`` or ``velocity``.
        sample_shape: shape of one sample, without the batch dimension (used by ``eval``).
        name: a label used in tables.
        prior: optional callable ``prior(generator, shape) -> Tensor`` for the starting noise
            (default: standard normal).
        identity: JSON-able facts that tell models with the same weights apart (part of the fingerprint).
        decode: optional ``decode(x) -> images`` for metrics and pictures of latent models (e.g. the VAE).
        dtype: the precision the network runs in (``torch.bfloat16``, "bf16", "fp16", ...; default: as
            given, a module's weights' dtype: :meth:`network_dtype`). Inputs are cast to it and outputs back to
            the solver state's dtype: the state, the coefficients and everything fitted stay in float32 (or
            float64).
        conditions: what the samples are conditioned on, as one :class:`~fewstep.guidance.Conditions`; or,
            one by one (the same object is built from them):
        guidance_scale: classifier-free guidance weight w (None: no guidance); guided
            E = E_u + w (E_c - E_u), cond and uncond run in one batched call (1 NFE).
        uncond: keyword arguments for the unconditional half (e.g. ``{"class_labels": null}``);
            a callable ``uncond(cond) -> dict`` is also accepted.
        cond_sampler: optional callable ``cond_sampler(seeds: list[int]) -> dict`` giving the
            conditioning for samples drawn from those seeds (e.g. class labels; a
            :class:`~fewstep.conditions.Conditioning` for prompt, class and guidance sets).
        guidance_input: the network takes the guidance scale itself (guidance-distilled models such as
            FLUX.1-dev): it gets ``guidance=`` (B,) and there is no unconditional half.
        num_classes: how many class labels a class-conditional network takes (for ``--classes all``).

    ``cost`` counts the network evaluations made (:mod:`fewstep.cost`).

    Per-sample guidance: a conditioning key ``guidance_scale`` holding a (B,) tensor overrides
    ``guidance_scale`` sample by sample (a model fitted across several scales sees several at once).
    """

    guidance_scale = _alias("conditions.guidance.scale", "The guidance scale w (None: unguided).")
    uncond = _alias("conditions.guidance.uncond", "The unconditional half's keyword arguments (or a callable).")
    guidance_input = _alias("conditions.guidance.takes_scale", "Does the network take the scale itself?")
    cond_sampler = _alias("conditions.sampler", "cond_sampler(seeds) -> the samples' keyword arguments.")
    num_classes = _alias("conditions.num_classes", "How many class labels the network takes (None: unknown).")

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: Schedule,
        prediction: str = "eps",
        sample_shape: tuple[int, ...] | None = None,
        guidance_scale: float | None = None,
        uncond: Mapping[str, Any] | Callable[[dict], dict] | None = None,
        name: str | None = None,
        prior: Callable[[torch.Generator, tuple[int, ...]], Tensor] | None = None,
        cond_sampler: Callable[[list[int]], dict[str, Any]] | None = None,
        identity: Mapping[str, Any] | None = None,
        guidance_input: bool = False,
        decode: Callable[[Tensor], Tensor] | None = None,
        num_classes: int | None = None,
        dtype: torch.dtype | str | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        super().__init__()
        check_prediction(prediction, schedule.kind)
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        flat = Conditions(Guidance(guidance_scale, uncond, bool(guidance_input)), cond_sampler, num_classes)
        if conditions is not None and flat != Conditions():
            raise FewstepError(
                "give conditions= or its parts (guidance_scale, uncond, cond_sampler, guidance_input, num_classes), "
                "not both"
            )
        self.conditions = conditions or flat
        self.name = name or getattr(net, "__class__", type(net)).__name__
        self.prior = prior
        self.identity = dict(identity or {})
        self.decode = decode
        self.nfe = 0
        self.cost = Cost()
        self.dtype: torch.dtype | None = None
        if dtype is not None:
            self.set_dtype(dtype)

    # ------------------------------------------------------------------ network call
    def set_dtype(self, dtype: torch.dtype | str) -> Denoiser:
        """Run the network in ``dtype`` (fp32 / fp16 / bf16 or a torch dtype); the solver stays in its own."""
        dt = torch_dtype(dtype)
        fp = self.fingerprint()  # the model's identity is its weights as given, whatever precision runs them
        if isinstance(self.net, nn.Module):
            self.net.to(dt)
        self.dtype = dt
        pin(self, fp)
        return self

    def raw(self, x: Tensor, t: Tensor | float, t_net: float | None = None, **cond: Any) -> Tensor:
        """The network output at solver time t (scalar), guidance applied, in x's dtype. Counts 1 NFE
        (``nfe``) and B network evaluations (``cost``).

        ``t_net``: the network's time input if already known (skips the schedule mapping).
        """
        dt = self.network_dtype()
        if dt is not None and x.dtype != dt:
            out = self._raw(
                x.to(dt),
                t,
                t_net,
                **{
                    k: (v.to(dt) if isinstance(v, Tensor) and v.is_floating_point() and k != "guidance_scale" else v)
                    for k, v in cond.items()
                },
            )
            return out.to(x.dtype)
        return self._raw(x, t, t_net, **cond)

    def network_dtype(self) -> torch.dtype | None:
        """The dtype the network runs in: ``dtype`` if set, else that of a module's first floating weight (a
        half-precision network given as such runs in half under a float32 solver state); None for a function."""
        if self.dtype is not None or not isinstance(self.net, nn.Module):
            return self.dtype
        cached = self.__dict__.get("_dtype_probe")  # (net, its first floating weight): looked up once per network
        if cached is None or cached[0] is not self.net:
            probe = next((w for w in self.net.parameters() if w.is_floating_point()), None)
            cached = (self.net, probe)
            self.__dict__["_dtype_probe"] = cached
        return None if cached[1] is None else cached[1].dtype

    def _raw(self, x: Tensor, t: Tensor | float, t_net: float | None = None, **cond: Any) -> Tensor:
        if t_net is not None:
            tn = torch.full((x.shape[0],), t_net, dtype=x.dtype, device=x.device)
        else:
            t64 = torch.as_tensor(t, dtype=torch.float64)
            tn = self.schedule.net_time(t64).to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        out, rows = self.conditions.guidance(self.net, x, tn, cond, self.prediction)
        self.nfe += 1
        return counted(out, self.cost, x.shape[0], rows)

    # ------------------------------------------------------------------ conversions
    def scalars(self, t: Tensor | float) -> TimeScalars:
        """alpha, sigma and their t-derivatives at solver time(s) t (vectorised, float64)."""
        return TimeScalars.of(self.schedule, t)

    def convert(self, out: Tensor, x: Tensor, t: Tensor | float, basis: str, sc: TimeScalars | None = None) -> Tensor:
        """Convert a raw network output at (x, t) to basis 'D', 'E' or 'v' (dx/dt): :func:`~.conversions.to_basis`.

        ``sc`` are precomputed scalars at t (the kernel computes them once per solve); their
        alpha, sigma keep autograd when t does, so learned evaluation times get exact gradients.
        """
        return to_basis(self.prediction, out, x, basis, sc or self.scalars(t))

    def to_DE(self, out: Tensor, x: Tensor, t: Tensor | float, sc: TimeScalars | None = None) -> tuple[Tensor, Tensor]:
        """(D, E) from a raw output at solver time t."""
        sc = sc or self.scalars(t)
        return to_DE(self.prediction, out, x, sc.alpha, sc.sigma)

    def _to_DE_fast(self, out: Tensor, x: Tensor, a: float, g: float) -> tuple[Tensor, Tensor]:
        """The same conversions with fused in-place ops (no autograd): the sampling hot path."""
        return to_DE_fast(self.prediction, out, x, a, g)

    def predict(
        self, x: Tensor, t: Tensor | float, basis: str = "D", sc: TimeScalars | None = None, **cond: Any
    ) -> Tensor:
        """One network call at solver time t, returned in ``basis`` ('D', 'E' or 'v')."""
        out = self.raw(x, t, sc.t_net if sc is not None else None, **cond)
        return to_basis(self.prediction, out, x, basis, sc or self.scalars(t))

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """The data prediction D(x, t)."""
        return self.predict(x, t, "D", **cond)

    # ------------------------------------------------------------------ identity and noise
    def fingerprint(self) -> str:
        """sha256 over the schedule, prediction, identity, prior and every weight of ``net`` (16 hex digits;
        :mod:`fewstep.fingerprint`), hashed once per weight version."""
        return fingerprint(self)

    def noise(self, seeds: list[int] | range, device: str | torch.device = "cpu") -> Tensor:
        """Standard starting noise, one generator per seed: shape (len(seeds), *sample_shape).

        The result does not depend on how seeds are batched.
        """
        if self.sample_shape is None:
            raise FewstepError("this Denoiser has no sample_shape: pass sample_shape=(...) when you build it")
        rows = []
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            if self.prior is not None:
                rows.append(self.prior(g, self.sample_shape))
            else:
                rows.append(torch.randn(self.sample_shape, generator=g))
        return torch.stack(rows).to(device)

    # ------------------------------------------------------------------ conditions (fewstep.guidance.Conditions)
    def with_conditions(self, spec: ConditionSpec) -> Denoiser:
        """This model drawing its class labels from ``spec.classes`` ("0,1,2" or "all") and, for several scales,
        its guidance scale per seed from ``spec.guidance`` (each seed draws one). Returns ``self``."""
        self.conditions = self.conditions.narrowed(spec, str(self.name))
        return self

    def guidance_scales(self) -> tuple[float, ...] | None:
        """The guidance scales the seeds draw from when there are several (a fit covers them all), else None."""
        return self.conditions.scales()

    def cond_key(self) -> str:
        """A name for the set conditions are drawn from ('' when the sampler does not name it): the teacher
        cache keys on it, the fingerprint does not (a solver fitted on one prompt set runs on another)."""
        return self.conditions.key()

    def cond_for(self, seeds: list[int] | range, device: str | torch.device = "cpu") -> dict[str, Any]:
        """Conditioning keyword arguments for samples drawn from ``seeds`` (empty if unconditional)."""
        return self.conditions.draw(list(seeds), device)


def check_finite(out: Tensor, where: str) -> None:
    """Raise ModelOutputError naming ``where`` if ``out`` holds NaN or inf."""
    if not torch.isfinite(out).all():
        bad = "NaN" if torch.isnan(out).any() else "inf"
        raise ModelOutputError(
            f"the model returned {bad} {where}: check the model, its prediction type and its schedule"
        )
