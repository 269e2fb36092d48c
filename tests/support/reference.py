"""The reference implementation's vectors, rebuilt from the committed JSON recipes.

tests/fixtures/reference/README.md says what each fixture holds and how it was made. A model
fixture stores no weights: a seeded recipe rebuilds every weight and input tensor (one generator,
in file order), and the reference implementation's outputs were computed on exactly those tensors.
Every rebuilt tensor's float64 sum is checked against the stored checksum, so a change in torch's
generator stream fails here by name instead of as a puzzling mismatch of model outputs.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
RECOGNITION = "vit"
EVA = "eva"
RETRIEVAL_VISUAL = "retrieval_visual"
RETRIEVAL_WTI = "retrieval_wti"
RETRIEVAL_METRICS = "retrieval_metrics"

DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
STATE_PREFIX = "state_dict/"


def rebuild(shape: List[int], dtype: str, kind: str, a: Any, b: Any, g: torch.Generator) -> torch.Tensor:
    """One tensor of the recipe; `literal` draws nothing from the generator."""
    if kind == "normal":
        t = torch.randn(shape, generator=g) * b + a
    elif kind == "uniform":
        t = torch.rand(shape, generator=g) * (b - a) + a
    elif kind == "literal":
        t = torch.tensor(a, dtype=torch.int64 if dtype == "int64" else torch.float64).reshape(shape)
    else:
        raise AssertionError(f"unknown tensor kind {kind!r} in a reference recipe")
    return t.to(DTYPES[dtype])


def check_sum(fixture: str, key: str, tensor: torch.Tensor, expected: float) -> None:
    got = tensor.double().sum().item()
    if not math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9):
        raise AssertionError(
            f"reference fixture {fixture}: rebuilt tensor {key!r} sums to {got!r}, the recipe says "
            f"{expected!r}: torch's random stream has changed, the fixture no longer rebuilds"
        )


def _tensor_entry(entry: Dict[str, Any]) -> torch.Tensor:
    # JSON has no infinities: they are stored as the strings "inf" / "-inf"
    values = [float(v) if isinstance(v, str) else v for v in entry["values"]]
    return torch.tensor(values, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _model_fixture(name: str, doc: Dict[str, Any]) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(int(doc["seed"]))
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    out: Dict[str, Any] = {"config": doc["config"], "state_dict": state}
    for key, shape, dtype, kind, a, b in doc["tensors"]:
        t = rebuild(shape, dtype, kind, a, b, g)
        check_sum(name, key, t, doc["checksums"][key])
        if key.startswith(STATE_PREFIX):
            state[key[len(STATE_PREFIX) :]] = t
        else:
            out[key] = t
    for key, value in doc["outputs"].items():
        out[key] = torch.tensor(value["values"], dtype=torch.float32).reshape(value["shape"])
    return out


def _entries_fixture(doc: Dict[str, Any]) -> Dict[str, Any]:
    return {
        key: _tensor_entry(v) if isinstance(v, dict) and v.get("tensor") else v for key, v in doc["entries"].items()
    }


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Dict[str, Any]:
    path = FIXTURES / f"{name}.json"
    if not path.is_file():
        raise AssertionError(f"reference fixture {path} is missing from the checkout")
    doc = json.loads(path.read_text())
    return _model_fixture(name, doc) if "tensors" in doc else _entries_fixture(doc)


def load_reference(name: str) -> Dict[str, Any]:
    """The fixture in the reference's own layout: `config`, `state_dict` (its key names and order),
    the inputs and outputs under their top-level names. A fresh copy each call (tests may edit it)."""
    return copy.deepcopy(_load(name))
