"""Denoiser: a network, its schedule and its prediction type, seen as D, E or velocity.

With x = alpha x0 + sigma eps, D the data prediction and E the noise prediction:
    eps:      E = out,            D = (x - sigma E) / alpha
    x0:       D = out,            E = (x - alpha D) / sigma
    v:        D = alpha x - sigma v, E = sigma x + alpha v      (v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1)
    velocity: D = x - t v,        E = x + (1 - t) v           (flow x = (1 - t) x0 + t eps, v = dx/dt)
The probability-flow velocity of any schedule is dx/dt = alpha' D + sigma' E.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, overload

import torch
from torch import Tensor, nn

from .conditions import ClassSet, Conditioning, GuidanceSet
from .cost import Cost, counted
from .errors import FewstepError, ModelOutputError, ShapeError
from .io import sha256_tensors
from .schedules import Schedule, TimeScalars

PREDICTIONS = ("eps", "x0", "v", "velocity")
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


BASES = ("D", "E", "v")


def _guided(w: Any) -> bool:
    """Does a scale (None, a number, or a (B,) tensor) ask for classifier-free guidance?"""
    if w is None:
        return False
    if isinstance(w, Tensor):
        return bool((w != 1.0).any())
    return float(w) != 1.0


def _cat_cond(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate cond and uncond keyword arguments along the batch dimension.

    A tensor only the unconditional half names (a flag such as ``negative``) is zero in the conditional half.
    """
    out: dict[str, Any] = {}
    for k, u in uncond.items():
        if k not in cond and isinstance(u, Tensor) and u.dim() > 0:
            out[k] = torch.cat([torch.zeros_like(u), u], 0)
    for k, v in cond.items():
        u = uncond.get(k, v)
        if isinstance(v, Tensor):
            u = u if isinstance(u, Tensor) else torch.as_tensor(u, dtype=v.dtype, device=v.device)
            if u.shape != v.shape:
                u = u.expand_as(v) if u.dim() == v.dim() or u.numel() == 1 else u
            out[k] = torch.cat([v, u.to(v.device, v.dtype)], 0)
        else:
            out[k] = v
    return out


class Denoiser(nn.Module):
    """Wrap ``net(x, t_net, **cond)`` into the internal form.

    Args:
        net: the network; called as ``net(x, t_net, **cond)`` with x of shape (B, ...) and
            t_net of shape (B,), and must return a tensor shaped like x.
        schedule: the model's :class:`~fewstep.schedules.Schedule`.
        prediction: what the network outputs: ``eps``, ``x0``, ``v`` or ``velocity``.
        sample_shape: shape of one sample, without the batch dimension (used by ``eval``).
        guidance_scale: classifier-free guidance weight w (None: no guidance); guided
            E = E_u + w (E_c - E_u), cond and uncond run in one batched call (1 NFE).
        uncond: keyword arguments for the unconditional half (e.g. ``{"class_labels": null}``);
            a callable ``uncond(cond) -> dict`` is also accepted.
        name: a label used in tables.
        prior: optional callable ``prior(generator, shape) -> Tensor`` for the starting noise
            (default: standard normal).
        cond_sampler: optional callable ``cond_sampler(seeds: list[int]) -> dict`` giving the
            conditioning for samples drawn from those seeds (e.g. class labels; a
            :class:`~fewstep.conditions.Conditioning` for prompt, class and guidance sets).
        guidance_input: the network takes the guidance scale itself (guidance-distilled models such as
            FLUX.1-dev): it gets ``guidance=`` (B,) and there is no unconditional half.
        decode: optional ``decode(x) -> images`` for metrics and pictures of latent models (e.g. the VAE).
        num_classes: how many class labels a class-conditional network takes (for ``--classes all``).
        dtype: the precision the network runs in (``torch.bfloat16``, "bf16", "fp16", ...; default: as
            given, a module's weights' dtype: :meth:`network_dtype`). Inputs are cast to it and outputs back to
            the solver state's dtype: the state, the coefficients and everything fitted stay in float32 (or
            float64).

    ``cost`` counts the network evaluations made (:mod:`fewstep.cost`).

    Per-sample guidance: a conditioning key ``guidance_scale`` holding a (B,) tensor overrides
    ``guidance_scale`` sample by sample (a model fitted across several scales sees several at once).
    """

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
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise FewstepError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if prediction == "v" and schedule.kind != "vp":
            raise FewstepError("prediction 'v' needs a VP schedule (alpha^2 + sigma^2 = 1)")
        if prediction == "velocity" and schedule.kind != "flow":
            raise FewstepError("prediction 'velocity' needs the Flow schedule (x = (1 - t) x0 + t eps)")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.guidance_scale = guidance_scale
        self.uncond = uncond
        self.name = name or getattr(net, "__class__", type(net)).__name__
        self.prior = prior
        self.cond_sampler = cond_sampler
        self.identity = dict(identity or {})
        self.guidance_input = bool(guidance_input)
        self.decode = decode
        self.num_classes = num_classes
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
        self.__dict__["_fingerprint"] = (self._fingerprint_key(), fp)
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
        w = cond.pop("guidance_scale", self.guidance_scale)
        if self.guidance_input:  # the network takes the scale itself: one call, no unconditional half
            scale = torch.as_tensor(1.0 if w is None else w, dtype=torch.float32, device=x.device)
            out = self.net(x, tn, guidance=scale.expand(x.shape[0]) if scale.dim() == 0 else scale, **cond)
            self._check_shape(out, tuple(x.shape))
            out = counted(out, self.cost, x.shape[0], x.shape[0])
        elif _guided(w):
            unc = self.uncond(cond) if callable(self.uncond) else dict(self.uncond or {})
            both = _cat_cond(cond, unc)
            out = self.net(torch.cat([x, x], 0), torch.cat([tn, tn], 0), **both)
            self._check_shape(out, (2 * x.shape[0], *x.shape[1:]))
            out_c, out_u = out.chunk(2, 0)
            if isinstance(w, Tensor):  # one scale per sample
                w = w.to(device=out.device, dtype=out.dtype).reshape(-1, *[1] * (out.dim() - 1))
            out = counted(out_u + w * (out_c - out_u), self.cost, x.shape[0], 2 * x.shape[0])
        else:
            out = self.net(x, tn, **cond)
            self._check_shape(out, tuple(x.shape))
            out = counted(out, self.cost, x.shape[0], x.shape[0])
        self.nfe += 1
        return out

    def _check_shape(self, out: Any, want: tuple[int, ...]) -> None:
        if not isinstance(out, Tensor):
            out = getattr(out, "sample", out)
            if not isinstance(out, Tensor):
                raise ShapeError(f"the network must return a tensor; got {type(out).__name__}")
        if tuple(out.shape) != want:
            raise ShapeError(
                f"the network returned shape {tuple(out.shape)} for input shape {want}: "
                f"it must return one {self.prediction} prediction shaped like its input"
            )

    # ------------------------------------------------------------------ conversions
    def scalars(self, t: Tensor | float) -> TimeScalars:
        """alpha, sigma and their t-derivatives at solver time(s) t (vectorised, float64)."""
        return TimeScalars.of(self.schedule, t)

    def convert(self, out: Tensor, x: Tensor, t: Tensor | float, basis: str, sc: TimeScalars | None = None) -> Tensor:
        """Convert a raw network output at (x, t) to basis 'D', 'E' or 'v' (dx/dt).

        ``sc`` are precomputed scalars at t (the kernel computes them once per solve); their
        alpha, sigma keep autograd when t does, so learned evaluation times get exact gradients.
        """
        p = self.prediction
        if (p, basis) in (("x0", "D"), ("eps", "E"), ("velocity", "v")):
            return out
        if basis not in BASES:
            raise FewstepError(f"unknown basis {basis!r}; valid: {', '.join(BASES)}")
        sc = sc or self.scalars(t)
        D, E = self.to_DE(out, x, t, sc)
        if basis == "D":
            return D
        if basis == "E":
            return E
        return sc.d_alpha * D + sc.d_sigma * E

    def to_DE(self, out: Tensor, x: Tensor, t: Tensor | float, sc: TimeScalars | None = None) -> tuple[Tensor, Tensor]:
        """(D, E) from a raw output at solver time t."""
        sc = sc or self.scalars(t)
        a, g = sc.alpha, sc.sigma
        p = self.prediction
        if isinstance(a, float) and not (out.requires_grad or x.requires_grad):
            return self._to_DE_fast(out, x, a, g)
        if p == "eps":
            E = out
            D = (x - g * E) / a
        elif p == "x0":
            D = out
            E = (x - a * D) / g
        elif p == "v":
            D = a * x - g * out
            E = g * x + a * out
        else:  # velocity, flow schedule: alpha = 1 - t, sigma = t
            D = x - g * out
            E = x + a * out
        return D, E

    def _to_DE_fast(self, out: Tensor, x: Tensor, a: float, g: float) -> tuple[Tensor, Tensor]:
        """The same conversions with fused in-place ops (no autograd): the sampling hot path."""
        p = self.prediction
        if p == "eps":
            return torch.add(x, out, alpha=-g).div_(a), out
        if p == "x0":
            return out, torch.add(x, out, alpha=-a).div_(g)
        if p == "v":
            return torch.mul(x, a).add_(out, alpha=-g), torch.mul(x, g).add_(out, alpha=a)
        return torch.add(x, out, alpha=-g), torch.add(x, out, alpha=a)

    def predict(
        self, x: Tensor, t: Tensor | float, basis: str = "D", sc: TimeScalars | None = None, **cond: Any
    ) -> Tensor:
        """One network call at solver time t, returned in ``basis`` ('D', 'E' or 'v')."""
        return self.convert(self.raw(x, t, sc.t_net if sc is not None else None, **cond), x, t, basis, sc)

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """The data prediction D(x, t)."""
        return self.predict(x, t, "D", **cond)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha256 over the schedule, prediction and every parameter and buffer of ``net`` (16 hex digits).

        Hashing every weight is slow for a large network, so the result is kept and reused until a
        weight tensor is replaced or changed in place (its version counter moves), or the schedule,
        prediction, identity or prior change.
        """
        key = self._fingerprint_key()
        cached = self.__dict__.get("_fingerprint")
        if cached is not None and cached[0] == key:
            return cached[1]
        fp = self._hash_weights()
        self.__dict__["_fingerprint"] = (key, fp)
        return fp

    def _fingerprint_key(self) -> tuple:
        """What the cached fingerprint depends on: the weight tensors (by storage and version) and the rest."""
        tensors = self.net.state_dict() if isinstance(self.net, nn.Module) else {}
        return (
            repr(sorted(self.schedule.config().items())),
            self.prediction,
            repr(sorted(self.identity.items())),
            id(self.prior),
            tuple((k, v.data_ptr(), v._version) for k, v in tensors.items()),
        )

    def _hash_weights(self) -> str:
        head = repr(sorted(self.schedule.config().items())).encode()
        head += self.prediction.encode()
        head += repr(sorted(self.identity.items())).encode()
        if self.prior is not None:  # another source distribution is another model
            head += self.noise([0, 1]).to(torch.float64).numpy().tobytes()
        weights = self.net.state_dict() if isinstance(self.net, nn.Module) else {}
        return sha256_tensors(weights, head)[:16]

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

    def with_conditions(self, classes: str | None = None, guidance: GuidanceSet | None = None) -> Denoiser:
        """This model drawing its class labels from ``classes`` ("0,1,2" or "all") and, for several scales, its
        guidance scale per seed (each seed draws one). Returns ``self``."""
        if classes is None and (guidance is None or len(guidance.scales) < 2):
            return self
        if classes is not None and self.num_classes is None and self.cond_sampler is None:
            raise FewstepError(f"{self.name} takes no class labels: drop --classes")
        if guidance is not None and len(guidance.scales) > 1 and self.uncond is None and not self.guidance_input:
            raise FewstepError(f"{self.name} has no unconditional half for guidance: give one scale or none")
        cset = None if classes is None else ClassSet.parse(classes, self.num_classes)
        self.cond_sampler = Conditioning(
            classes=cset,
            guidance=guidance if guidance and len(guidance.scales) > 1 else None,
            base=self.cond_sampler if cset is None else None,
            default_guidance=float(self.guidance_scale or 1.0),
        )
        return self

    def guidance_scales(self) -> tuple[float, ...] | None:
        """The guidance scales the seeds draw from when there are several (a fit covers them all), else None."""
        c = self.cond_sampler
        if isinstance(c, Conditioning) and c.guidance is not None and len(c.guidance.scales) > 1:
            return c.guidance.scales
        return None

    def cond_key(self) -> str:
        """A name for the set conditions are drawn from ('' when the sampler does not name it): the teacher
        cache keys on it, the fingerprint does not (a solver fitted on one prompt set runs on another)."""
        return self.cond_sampler.digest() if isinstance(self.cond_sampler, Conditioning) else ""

    def cond_for(self, seeds: list[int] | range, device: str | torch.device = "cpu") -> dict[str, Any]:
        """Conditioning keyword arguments for samples drawn from ``seeds`` (empty if unconditional)."""
        if self.cond_sampler is None:
            return {}
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.cond_sampler(list(seeds)).items()}


def check_finite(out: Tensor, where: str) -> None:
    """Raise ModelOutputError naming ``where`` if ``out`` holds NaN or inf."""
    if not torch.isfinite(out).all():
        bad = "NaN" if torch.isnan(out).any() else "inf"
        raise ModelOutputError(
            f"the model returned {bad} {where}: check the model, its prediction type and its schedule"
        )
