"""Model specs: ``zoo:NAME``, ``path/to/file.py:factory``, ``package.module:factory``, ``diffusers:DIR``,
``torchcfm:NAME_OR_PATH`` (the pretrained TorchCFM 2-D flow models, loaded without unpickling code).

A factory is a callable taking no required argument and returning a :class:`fewstep.Denoiser`. A factory
spec runs that file's or module's code (as ``python file.py`` would): use specs you trust. An error in
that code is reported in one line naming the file; ``FEWSTEP_DEBUG=1`` (``fewstep --debug``) shows its
traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any, TypeVar

from .conditions import ConditionSpec
from .denoiser import Denoiser, check_dtype
from .errors import ModelSpecError, debug

if TYPE_CHECKING:
    from torch import nn

T = TypeVar("T")

FORMS = "zoo:NAME, path/to/file.py:factory, package.module:factory, diffusers:DIR or torchcfm:NAME_OR_PATH"


def _user_error(spec: str, what: str, e: BaseException) -> ModelSpecError:
    """One line for an exception raised by the user's own code (the traceback with FEWSTEP_DEBUG=1 / --debug)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    where = ""
    if isinstance(e, SyntaxError) and e.lineno:
        where = f" at line {e.lineno}"
    return ModelSpecError(
        f"{spec!r}: {what} raised {type(e).__name__}{where}: {lines[0][:200] if lines else ''} "
        f"(rerun with --debug or FEWSTEP_DEBUG=1 for the traceback)"
    )


def _call(fn: Any, spec: str, kind: type[T], kind_name: str, **kwargs: Any) -> T:
    """Call the factory named by ``spec`` and check that it returned a ``kind``."""
    if not callable(fn):
        raise ModelSpecError(f"{spec!r}: the factory is not callable")
    try:
        obj = fn(**kwargs) if kwargs else fn()
    except TypeError as e:
        if debug():
            raise
        raise ModelSpecError(
            f"{spec!r}: calling the factory failed ({e}); it must take no required arguments"
        ) from None
    except Exception as e:  # noqa: BLE001 - the user's code: any failure becomes one line naming it
        if debug():
            raise
        raise _user_error(spec, "the factory", e) from None
    if not isinstance(obj, kind):
        raise ModelSpecError(f"{spec!r}: the factory returned {type(obj).__name__}, not a {kind_name}")
    return obj


def _call_factory(fn: Any, spec: str, **kwargs: Any) -> Denoiser:
    model = _call(fn, spec, Denoiser, "fewstep.Denoiser", **kwargs)
    if model.name in (None, "", type(model.net).__name__):
        model.name = spec
    return model


#: condition options every spec takes (see :func:`load_model`)
CONDITION_OPTIONS = ("prompts", "classes", "guidance", "height", "width", "dtype")


def load_model(
    spec: str,
    device: str = "cpu",
    prompts: Any = None,
    classes: str | None = None,
    guidance: Any = None,
    height: int | None = None,
    width: int | None = None,
    dtype: Any = None,
    conditions: ConditionSpec | None = None,
    **kwargs: Any,
) -> Denoiser:
    """Build the Denoiser named by ``spec`` on ``device``.

    What it is conditioned on: ``conditions`` (a :class:`~fewstep.conditions.ConditionSpec`), or its parts
    ``prompts`` (a prompt set, for text-to-image pipelines), ``classes`` ("0,1,2" or "all", for
    class-conditional models) and ``guidance`` (one scale, or several: "3,7.5,12", "3:12"; each seed draws
    one). ``height``/``width`` (image size of a pipeline), ``dtype`` (fp32 / fp16 / bf16 the network runs in).
    ``kwargs`` go to the model's own builder; a zoo model or factory gets the one scale as ``guidance_scale``.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSpecError(f"model spec {spec!r} is not one of: {FORMS}")
    if conditions is not None and any(v is not None for v in (prompts, classes, guidance)):
        raise ModelSpecError("give conditions= or prompts= / classes= / guidance=, not both")
    head = spec.partition(":")[0]
    pipeline = head == "diffusers" or _zoo_pipeline(spec)
    if not pipeline:
        given = prompts if conditions is None else conditions.prompts
        for name, v in (("prompts", given), ("height", height), ("width", width)):
            if v is not None:
                raise ModelSpecError(
                    f"{spec!r}: --{name} applies to pipelines (diffusers:DIR and the zoo's scenes-*) only"
                )
    conditions = conditions or ConditionSpec.parse(prompts, classes, guidance)
    if pipeline:
        if dtype is not None:
            check_dtype(dtype, device)
        size = {k: v for k, v in dict(height=height, width=width, dtype=dtype).items() if v is not None}
        return _load(spec, device, conditions=conditions, **size, **kwargs)
    if conditions.scale is not None:
        kwargs["guidance_scale"] = conditions.scale
    model = _load(spec, device, **kwargs).with_conditions(conditions)
    return model if dtype is None else model.set_dtype(check_dtype(dtype, device))


def _zoo_pipeline(spec: str) -> bool:
    """Is ``spec`` a zoo model that is a whole diffusers pipeline (``zoo:scenes-sd``, ...)?"""
    head, _, tail = spec.partition(":")
    if head != "zoo":
        return False
    from .zoo import PIPELINES

    return tail in PIPELINES


def _load(spec: str, device: str, **kwargs: Any) -> Denoiser:
    head, _, tail = spec.partition(":")
    if head == "zoo":
        from . import zoo

        return zoo.load(tail, device=device, **kwargs)
    if head == "torchcfm":
        from .zoo.torchcfm import load_torchcfm

        return load_torchcfm(tail, device=device, **kwargs)
    if head == "diffusers":
        try:
            from .integrations.load import load_diffusers
        except ImportError as e:
            raise ModelSpecError(f"{spec!r}: the diffusers integration is not available ({e})") from None
        return load_diffusers(tail, device=device, **kwargs)
    model = _call_factory(_factory(spec, "model", FORMS), spec, **kwargs)
    return model.to(device) if hasattr(model, "to") else model


def _factory(spec: str, what: str, forms: str) -> Any:
    """The attribute named by ``path/to/file.py:attr`` or ``package.module:attr``."""
    path, _, attr = spec.rpartition(":")
    if not attr or not path:
        raise ModelSpecError(f"{what} spec {spec!r} names no factory after ':'; expected {forms}")
    if path.endswith(".py"):
        if not os.path.isfile(path):
            raise ModelSpecError(f"{what} file {path!r} does not exist")
        name = "fewstep_user_" + os.path.splitext(os.path.basename(path))[0]
        mspec = importlib.util.spec_from_file_location(name, path)
        if mspec is None or mspec.loader is None:
            raise ModelSpecError(f"cannot import {path!r}")
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[name] = mod
        try:
            mspec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - SyntaxError, ImportError, anything the file raises
            sys.modules.pop(name, None)
            if debug():
                raise
            raise _user_error(spec, f"running {path}", e) from None
    else:
        try:
            mod = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name and path.startswith(e.name):
                raise ModelSpecError(f"cannot import module {path!r} ({e}); expected {forms}") from None
            if debug():
                raise
            raise _user_error(spec, f"importing {path}", e) from None
        except Exception as e:  # noqa: BLE001 - the module's own import-time code: any failure becomes one line
            if debug():
                raise
            raise _user_error(spec, f"importing {path}", e) from None
    if not hasattr(mod, attr):
        raise ModelSpecError(f"{path!r} has no attribute {attr!r}")
    return getattr(mod, attr)


FEATURE_FORMS = "digits, path/to/file.py:factory or package.module:factory (returning a torch nn.Module)"


def load_feature(spec: str, device: str = "cpu") -> str | nn.Module:
    """A feature network for FD / KID: ``"digits"`` (the built-in classifier) or a factory spec whose
    callable, taking no required argument, returns an ``nn.Module`` mapping samples (B, ...) to (B, F)."""
    if spec == "digits":
        return spec
    from torch import nn

    return _call(_factory(spec, "feature", FEATURE_FORMS), spec, nn.Module, "torch nn.Module").to(device).eval()
