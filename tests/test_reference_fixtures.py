"""The reference fixtures stand alone: committed as JSON recipes, rebuilt and checksummed here,
and nothing in the repository reaches outside it for test data."""

import json
import re

import pytest

from tests.support import REPO
from tests.support.reference import FIXTURES, _model_fixture, load_reference

MODEL_FIXTURES = {"vit": 146, "eva": 138, "retrieval_visual": 148, "retrieval_wti": 186}


@pytest.mark.parametrize("name", sorted(MODEL_FIXTURES))
def test_every_model_fixture_rebuilds_in_the_reference_layout(name):
    ref = load_reference(name)
    assert len(ref["state_dict"]) == MODEL_FIXTURES[name]
    assert all("." in k and not k.startswith("state_dict/") for k in ref["state_dict"])
    # a fresh copy per call: a test that edits its fixture cannot change another's
    ref["state_dict"][next(iter(ref["state_dict"]))].zero_()
    again = load_reference(name)
    assert again["state_dict"][next(iter(again["state_dict"]))].abs().sum() > 0


def test_a_changed_random_stream_fails_by_name():
    doc = json.loads((FIXTURES / "vit.json").read_text())
    doc["seed"] = 1  # what a change in torch's generator looks like to the recipe
    first = doc["tensors"][0][0]
    with pytest.raises(AssertionError, match=rf"reference fixture vit: rebuilt tensor '{re.escape(first)}' sums to"):
        _model_fixture("vit", doc)


def test_the_repository_needs_nothing_beside_it():
    """No weights or .pt fixtures in the tree, and no code or test reads the shared folder."""
    assert not list(REPO.glob("tests/**/*.pt"))
    pattern = re.compile(r"\.\.[/\\]shared|parents?(\[\d\])? / \"shared\"")
    files = [
        REPO / "Makefile",
        *(
            p
            for folder in ("side4video", "tests", ".ci", "launch", "slurm")
            for p in (REPO / folder).rglob("*")
            if p.is_file()
        ),
    ]
    for path in files:
        if path.suffix in ("", ".py", ".sh", ".sbatch", ".md", ".yaml"):
            assert not pattern.search(path.read_text(errors="ignore")), path
