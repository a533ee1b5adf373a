"""A seeded fuzz test of the learned-solver loader: random damage to ``solver.json`` and ``params.safetensors``.

Every outcome must be either a solver that loads and samples finite values on the model it was fitted for
(and, for damage to the parameter file, ``learned()`` rebuilds its trainable solver) or exactly one
:class:`fewstep.errors.FewstepError` whose message is one line: never another exception from deep inside.
The field-by-field cases with fixed damage are in test_faults.py and test_cli_faults.py.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import random
import struct
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import fewstep
from fewstep import VPLinear
from fewstep.errors import FewstepError
from fewstep.fit.api import fit
from gauss import make_gauss

F64 = torch.float64
SEED = 20240531
JSON_CASES = 800
PARAMS_CASES = 400
# the top-level fields whose values the loader uses (most damage lands here rather than in the fit's records)
READ = ("schema", "method", "label", "nfe", "schedule", "model", "tableau", "params")
POOL: list[Any] = [
    None,
    "",
    "abc",
    "1e3",
    "0123456789abcdef",
    "../x",
    "/etc/passwd",
    -1,
    0,
    1,
    2,
    4,
    3.5,
    -0.0,
    1e-300,
    1e6,
    1e7,
    10**30,
    10**400,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    [],
    [0],
    [1, 2],
    [[1]],
    [None],
    {},
    {"a": 1},
    {"type": "vp_linear"},
]


# ----------------------------------------------------------------------------- the artifact and the model
@pytest.fixture(scope="module")
def model():
    return make_gauss(VPLinear(), "eps", d=6)


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory, one_thread):
    """One valid artifact (unipc start: every table, the corrector included), as bytes."""
    d = tmp_path_factory.mktemp("fuzz-art")
    fit(
        model,
        "s4s-alt",
        4,
        out=d / "a",
        teacher="dpmpp_3m@logsnr:40",
        samples=64,
        val_samples=32,
        confirm_samples=0,
        progress=False,
        cache_dir=d / "c",
        steps=16,
        eval_every=8,
        start="unipc@logsnr",
    )
    return {"json": (d / "a" / "solver.json").read_text(), "params": (d / "a" / "params.safetensors").read_bytes()}


@pytest.fixture(scope="module")
def noise():
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=F64)


# ----------------------------------------------------------------------------- damage to solver.json
def _nodes(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path below ``node`` (not the root itself)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out.append(path + (k,))
        out.extend(_nodes(v, path + (k,)))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _pick(rng: random.Random, doc: dict, want: Callable[[Any], bool] = lambda v: True) -> tuple | None:
    paths = [p for p in _nodes(doc) if want(_get(doc, p))]
    if not paths:
        return None
    read = [p for p in paths if p[0] in READ]
    return rng.choice(read if read and rng.random() < 0.8 else paths)


def _retype(v: Any, rng: random.Random) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return rng.choice([float(v) if abs(v) < 1e300 else str(v), str(v), [v], bool(v)])
    if isinstance(v, float):
        return rng.choice([int(v) if math.isfinite(v) else 0, repr(v), [v], {"v": v}])
    if isinstance(v, str):
        return rng.choice([list(v), len(v), {v: v}, v.encode().hex()])
    if isinstance(v, list):
        return rng.choice([{str(i): x for i, x in enumerate(v)}, tuple(v) and v[0], json.dumps(v), len(v)])
    if isinstance(v, dict):
        return rng.choice([list(v.values()), list(v), json.dumps(v), None])
    return 0


def _perturb(v: Any, rng: random.Random) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v
    try:
        return rng.choice([-v, v * (1 + 1e-3), v * 10, v + 1e-9, v - 1, v * 1e5, v / 3])
    except OverflowError:  # an int beyond float range (from the pool)
        return -v


def mutate_doc(doc: dict, rng: random.Random) -> str:
    """Apply one random change to ``doc`` in place; returns what it did."""
    op = rng.choice(["delete", "replace", "replace", "list", "retype", "perturb", "perturb"])
    if op == "delete":
        p = _pick(rng, doc)
        del _get(doc, p[:-1])[p[-1]]
        return f"delete {p}"
    if op == "replace":
        p = _pick(rng, doc)
        v = copy.deepcopy(rng.choice(POOL))
        _get(doc, p[:-1])[p[-1]] = v
        return f"{p} = {v!r}"
    if op == "list":
        p = _pick(rng, doc, lambda v: isinstance(v, list) and len(v) > 0)
        if p is None:
            return "no list"
        lst = _get(doc, p)
        i = rng.randrange(len(lst))
        if rng.random() < 0.5:
            del lst[i]
            return f"drop {p}[{i}]"
        lst.insert(i, copy.deepcopy(lst[i]))
        return f"duplicate {p}[{i}]"
    if op == "retype":
        p = _pick(rng, doc)
        parent = _get(doc, p[:-1])
        parent[p[-1]] = _retype(parent[p[-1]], rng)
        return f"retype {p} -> {parent[p[-1]]!r:.60}"
    p = _pick(rng, doc, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    if p is None:
        return "no number"
    parent = _get(doc, p[:-1])
    parent[p[-1]] = _perturb(parent[p[-1]], rng)
    return f"perturb {p} -> {parent[p[-1]]!r}"


def mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    """Damage to the file's bytes rather than its structure."""
    op = rng.choice(["truncate", "flip", "append"])
    i = rng.randrange(len(text))
    if op == "truncate":
        return text[:i], f"truncate at {i}"
    if op == "flip":
        return text[:i] + chr(rng.randrange(32, 127)) + text[i + 1 :], f"char {i} replaced"
    return text + rng.choice(["}", "x", "\x00", "{}", "]"]), "trailing garbage"


# ----------------------------------------------------------------------------- damage to params.safetensors
def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _resave(data: bytes, change: Callable[[dict, dict], None]) -> bytes:
    """Rewrite a safetensors file through safetensors itself: ``change(tensors, metadata)``."""
    from safetensors.torch import load, save

    header, _ = _split(data)
    tensors = load(data)
    meta = dict(header.get("__metadata__") or {})
    change(tensors, meta)
    return save(tensors, metadata=meta)


def mutate_params(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    op = rng.choice(["flip", "flip", "truncate", "tensor", "tensor", "drop", "structure", "header"])
    if op == "flip":
        n = rng.randint(1, 4)
        b = bytearray(data)
        where = [rng.randrange(len(b)) for _ in range(n)]
        for i in where:
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip bits at {where}"
    if op == "truncate":
        i = rng.randrange(len(data))
        return data[:i], f"truncate at {i}"
    if op == "drop":
        name = rng.choice(sorted(_split(data)[0].keys() - {"__metadata__"}))
        return _resave(data, lambda t, m: t.pop(name)), f"drop tensor {name}"
    if op == "tensor":
        name = rng.choice(sorted(_split(data)[0].keys() - {"__metadata__"}))
        how = rng.choice(["nan", "scale", "shape", "dtype", "zeros", "huge"])

        def change(t: dict, m: dict) -> None:
            v = t[name]
            if how == "nan" and v.is_floating_point() and v.numel():
                v = v.clone()
                v.view(-1)[rng.randrange(v.numel())] = float("nan")
            elif how == "scale" and v.is_floating_point():
                v = v * 1.5 + 0.1
            elif how == "shape":
                v = torch.zeros(*(s + rng.choice([-1, 1]) for s in v.shape), dtype=v.dtype) if v.dim() else v.reshape(1)
            elif how == "dtype":
                v = v.to(rng.choice([torch.float32, torch.int64, torch.uint8, torch.float16]))
            elif how == "zeros":
                v = torch.zeros_like(v)
            elif how == "huge" and v.is_floating_point():
                v = torch.full_like(v, 1e300)
            t[name] = v.contiguous()

        return _resave(data, change), f"tensor {name}: {how}"
    if op == "structure":
        key = None

        def change(t: dict, m: dict) -> None:
            nonlocal key
            st = json.loads(m["structure"])
            key = rng.choice(sorted(st))
            st[key] = copy.deepcopy(rng.choice(POOL)) if rng.random() < 0.7 else _retype(st[key], rng)
            m["structure"] = json.dumps(st)

        out = _resave(data, change)
        return out, f"structure.{key} changed"
    # the header's own JSON: a tensor's offsets, dtype or shape
    header, body = _split(data)
    name = rng.choice(sorted(header.keys() - {"__metadata__"}))
    field = rng.choice(["data_offsets", "dtype", "shape"])
    header[name][field] = {"data_offsets": [0, len(body) + 8], "dtype": "F32", "shape": [3, 1000]}[field]
    return _join(header, body), f"header {name}.{field}"


# ----------------------------------------------------------------------------- running the cases
class Bad(Exception):
    """An outcome that is neither a working solver nor one clean FewstepError."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def _attempt(folder: Path, model, noise, with_params: bool) -> str:
    """'loaded' or the FewstepError's class name; raises Bad for anything else."""
    try:
        loaded = fewstep.load_solver(folder)
        x = fewstep.sample(model, noise, loaded)
        if not torch.isfinite(x).all():
            raise Bad("non-finite samples", json.dumps(loaded.doc.get("tableau"))[:300])
        if with_params:
            s = loaded.learned()
            with torch.no_grad():
                tab = s.tableau()
            if not all(torch.isfinite(getattr(tab, k)).all() for k in ("t", "a", "B")):
                raise Bad("non-finite tables from learned()", "")
    except FewstepError as e:
        msg = str(e)
        if not msg or "\n" in msg:
            raise Bad(f"multi-line {type(e).__name__}", msg) from None
        return type(e).__name__
    except Bad:
        raise
    except Exception as e:  # any other exception is what the test is looking for
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise Bad(
            f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}",
            "".join(traceback.format_exception(e)[-4:]),
        ) from None
    return "loaded"


#: bugs this fuzz finds that have a dedicated strict-xfail test below: (description, matches a Bad)
KNOWN: list[tuple[str, Callable[[Bad], bool]]] = []  # none open (the three it found are fixed)


def _run_cases(kind: str, n: int, artifact: dict, model, noise, tmp_path: Path) -> tuple[collections.Counter, list]:
    rng = random.Random(f"{SEED}-{kind}")
    tally: collections.Counter = collections.Counter()
    failures = []
    good = json.loads(artifact["json"])
    for i in range(n):
        d = tmp_path / f"{kind}{i}"
        d.mkdir()
        text, data = artifact["json"], artifact["params"]
        if kind == "json":
            if rng.random() < 0.15:
                text, what = mutate_text(text, rng)
            else:
                doc = copy.deepcopy(good)
                what = "; ".join(mutate_doc(doc, rng) for _ in range(rng.choice([1, 1, 1, 2, 3])))
                text = json.dumps(doc)
        else:
            data, what = mutate_params(data, rng)
        (d / "solver.json").write_text(text)
        (d / "params.safetensors").write_bytes(data)
        try:
            tally[_attempt(d, model, noise, kind == "params")] += 1
        except Bad as b:
            known = next((desc for desc, match in KNOWN if match(b)), None)
            tally[f"known bug ({known})" if known else f"BAD {b.kind}"] += 1
            if not known:
                failures.append((i, what, b))
    return tally, failures


def _report(kind: str, tally: collections.Counter, failures: list) -> str:
    lines = [f"{kind}: {sum(tally.values())} cases: " + ", ".join(f"{k} {v}" for k, v in tally.most_common())]
    shown: collections.Counter = collections.Counter()
    for i, what, b in failures:
        shown[b.kind] += 1
        if shown[b.kind] <= 2:
            lines.append(f"  case {i}: {what}\n    {b.kind}: {b.detail.strip()[-700:]}")
    return "\n".join(lines)


@pytest.mark.parametrize("kind,n", [("json", JSON_CASES), ("params", PARAMS_CASES)])
def test_damaged_artifacts_load_and_sample_or_raise_one_fewstep_error(
    kind, n, artifact, model, noise, tmp_path, one_thread
):
    tally, failures = _run_cases(kind, n, artifact, model, noise, tmp_path)
    report = _report(kind, tally, failures)
    print(report)
    assert not failures, report
    refused = sum(v for k, v in tally.items() if k != "loaded")
    assert tally["loaded"] >= n // 10 and refused >= n // 4, f"damage too mild or too harsh to test much\n{report}"


# ----------------------------------------------------------------------------- bugs the fuzz found (fixed)
@pytest.mark.parametrize("damage", ["drop a tensor", "a tensor of another shape"])
def test_a_params_file_that_does_not_fit_the_solver_is_refused_in_one_line(artifact, tmp_path, damage):
    d = tmp_path / "a"
    d.mkdir()
    (d / "solver.json").write_text(artifact["json"])

    def change(t: dict, m: dict) -> None:
        if damage == "drop a tensor":
            t.pop("W")
        else:
            t["u"] = torch.zeros(t["u"].numel() + 1, dtype=t["u"].dtype)

    (d / "params.safetensors").write_bytes(_resave(artifact["params"], change))
    loaded = fewstep.load_solver(d)
    with pytest.raises(FewstepError) as e:
        loaded.learned()
    assert "\n" not in str(e.value), str(e.value)


def _outcome(artifact: dict, change: Callable[[dict], None], model, noise, tmp_path: Path) -> str:
    d = tmp_path / "edited"
    d.mkdir()
    doc = json.loads(artifact["json"])
    change(doc)
    (d / "solver.json").write_text(json.dumps(doc))
    (d / "params.safetensors").write_bytes(artifact["params"])
    try:
        return _attempt(d, model, noise, with_params=False)
    except Bad as b:
        raise AssertionError(f"{b.kind}: {b.detail}") from None


def _later_evaluation(doc: dict) -> None:
    tab = doc["tableau"]
    assert tab["C"] is not None, "the artifact has no corrector"
    tab["C"][0][2] = 0.5  # step 0's corrector (applied at step 1) using F_2, which step 2 makes
    if tab.get("C_mask") is not None:
        tab["C_mask"][0][2] = 1


def test_a_corrector_that_uses_a_later_evaluation_is_refused(artifact, model, noise, tmp_path):
    assert _outcome(artifact, _later_evaluation, model, noise, tmp_path) == "ArtifactError"


def test_a_guidance_scale_beyond_float_range_is_refused(artifact, model, noise, tmp_path):
    assert (
        _outcome(artifact, lambda doc: doc["model"].__setitem__("guidance_scale", 10**400), model, noise, tmp_path)
        == "ArtifactError"
    )
