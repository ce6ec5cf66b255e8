"""The census (benchmarks/census.py) against the real libraries: for each family CI has time for,
one model built from its config with random weights, accelerated, trained one step (which checks
every block's derived forward against its own), then compared with an untouched copy: evaluation
and rate-0 training bit-identical, and at rate 1 no branch runs. The whole census (every timm
architecture module, every transformers vision model type; about 25 minutes here) is the command
in docs/models.md, whose table is checked against its JSON below. Older releases of timm and
transformers are installed beside the current ones and run through the same path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "benchmarks" / "census.json"


def _census():
    if "census" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("census", ROOT / "benchmarks" / "census.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["census"] = module
        spec.loader.exec_module(module)
    return sys.modules["census"]


# The families the issue names and those of docs/models.md, as many as CI has time for (about 3
# minutes): the rest run in the full census.
TIMM = (
    "vision_transformer",
    "deit",
    "beit",
    "eva",
    "convnext",
    "swin_transformer",
    "swin_transformer_v2",
    "efficientnet",
    "resnet",
    "cait",
    "davit",
    "metaformer",
    "pvt_v2",
    "twins",
    "focalnet",
    "xcit",
    "tiny_vit",
    "edgenext",
    "inception_next",
    "mambaout",
    "vision_transformer_relpos",
    "fastvit",
    "levit",
    "rexnet",  # the site under two nested `if`s, its output concatenated
)
HF = (
    "convnext",
    "dinov2",
    "dinov2_with_registers",
    "dinov3_vit",
    "dinov3_convnext",
    "beit",
    "data2vec-vision",
    "swin",
    "swinv2",
    "segformer",
    "convnextv2",
    "pvt_v2",
    "poolformer",
    "focalnet",
    "hiera",
    "vitdet",  # sizes assigned under an `if` in the branch and read under the same `if` later
)


def _assert_family(row) -> None:
    assert not row.error, row.error
    assert row.sites > 0
    assert row.runs.get("mask", 0) == 0, row.reasons
    assert row.eval_same is True, "evaluation differs from the original"
    assert row.zero_same is True, "rate-0 training differs from the original"
    assert row.branches_at_one == 0, "a branch ran at rate 1"


@pytest.mark.parametrize("family", TIMM)
def test_timm_family(family):
    require("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_family(_census().timm_family(family, checks=True))


@pytest.mark.parametrize("family", HF)
def test_transformers_family(family):
    require("transformers")
    census = _census()
    found = {t: (c, m) for t, c, m in census._hf_classes()}
    assert family in found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_family(census.hf_family(family, *found[family], checks=True))


def test_docs_table_is_the_census_json():
    rows = json.loads(RESULT.read_text())
    table = _census().markdown(rows)
    assert table in (ROOT / "docs" / "models.md").read_text()
    totals = {}
    for library in ("timm", "transformers"):
        mine = [r for r in rows if r["library"] == library]
        sites = sum(r["sites"] for r in mine)
        totals[library] = sum(r["sites"] - r["runs"].get("mask", 0) for r in mine) / sites
    assert totals["timm"] >= 0.9 and totals["transformers"] >= 0.9, totals


def test_docs_release_table_is_the_releases_json():
    rows = json.loads((ROOT / "benchmarks" / "releases.json").read_text())
    assert _census().markdown(rows) in (ROOT / "docs" / "models.md").read_text()
    releases = {r["library"] for r in rows}
    assert {"timm 1.0.15", "timm 1.0.20", "timm 1.0.26", "timm 1.0.31"} <= releases
    assert {"transformers 4.46.3", "transformers 4.57.6", "transformers 5.24.0"} <= releases
    assert all(r["sites"] and not r["runs"].get("mask") and r["eval_same"] for r in rows), rows


OLD = {"timm": "1.0.20", "transformers": "4.57.6"}


def test_an_older_release_of_each_library(tmp_path):
    """timm 1.0.20 and transformers 4.57.6 (the last 4.x), installed beside the current ones
    (``pip install --target``), through the same derive-and-check path, on the docs' families."""
    require("timm")
    require("transformers")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    timm_dir, hf_dir = tmp_path / "timm", tmp_path / "hf"
    subprocess.run([*pip, "--no-deps", "--target", timm_dir, f"timm=={OLD['timm']}"], check=True)
    subprocess.run([*pip, "--target", hf_dir, f"transformers=={OLD['transformers']}"], check=True)
    script = ROOT / "benchmarks" / "census.py"
    runs = (
        (timm_dir, "timm", ["vision_transformer", "deit", "eva", "efficientnet", "resnet"]),
        (hf_dir, "transformers", ["convnext", "dinov2", "beit", "swin", "segformer"]),
    )
    for path, library, families in runs:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), str(ROOT / "src")]))
        cmd = [
            sys.executable,
            str(script),
            "--library",
            library,
            "--json",
            str(tmp_path / "o.json"),
        ]
        out = subprocess.run(
            [*cmd, "--only", *families], env=env, capture_output=True, text=True, check=True
        )
        version = subprocess.run(
            [sys.executable, "-c", f"import {library}; print({library}.__version__)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert version == OLD[library]
        rows = json.loads((tmp_path / "o.json").read_text())
        assert sorted(r["family"] for r in rows) == sorted(families), out.stdout
        for r in rows:
            assert r["sites"] > 0 and not r["error"], r
            assert r["runs"].get("mask", 0) == 0, (library, r["family"], r["reasons"])
