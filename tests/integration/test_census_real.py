"""The census (benchmarks/census.py) against the real libraries: for every family of census.json,
its model built again from its config with random weights, accelerated, trained one step (which
checks every block's derived forward against its own under fixed keep decisions), then compared
with an untouched copy: evaluation and rate-0 training bit-identical, and at rate 1 no branch runs.
The census itself (the search for each family's smallest variant, then the same steps) is the
command in docs/models.md, whose table is checked against its JSON below. Older releases of timm
and transformers are installed beside the current ones and run through the same path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

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


ROWS = json.loads(RESULT.read_text())
# every family the census built a model for: 75 timm architecture modules, 35 transformers types
BUILT = [r for r in ROWS if r["sites"]]
# the families with sites on the mask: no dropped work to skip without changing what the block
# computes (docs/models.md says why); every other family's sites all skip work
MASKED = {("timm", "coat"), ("timm", "resnest"), ("transformers", "swiftformer")}


@pytest.mark.parametrize("recorded", BUILT, ids=lambda r: f"{r['library']}:{r['family']}")
def test_family(recorded):
    """The family's row of census.json measured again, on the model it records built the same way
    (no search for the smallest variant: the full census does that; random weights, parameters
    the library sets to one value drawn too): the same sites, running the same way for the same
    reasons (a derived forward that fails its check runs on the mask), and its three checks."""
    require(recorded["library"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = _census().replay(recorded)
    assert not row.error, row.error
    assert (row.model, row.sites) == (recorded["model"], recorded["sites"])
    assert row.runs == recorded["runs"] and row.reasons == recorded["reasons"], row.reasons
    assert not row.runs.get("mask") or (row.library, row.family) in MASKED, row.reasons
    assert row.called, "no drop-path site is called: nothing was checked"
    assert row.eval_same is True, "evaluation differs from the original"
    assert row.zero_same is True, "rate-0 training differs from the original"
    assert row.branches_at_one == 0, "a branch ran at rate 1"


def test_the_census_has_a_row_for_every_family():
    """census.json lists every timm architecture module and transformers model type of the installed
    releases (those without a model say why), and its search still picks the recorded variants."""
    timm = require("timm")
    require("transformers")
    census = _census()
    families = {(r["library"], r["family"]) for r in ROWS}
    assert families == {("timm", m) for m in timm.list_modules()} | {
        ("transformers", t) for t, _, _ in census._hf_classes()
    }
    assert all(r["error"] for r in ROWS if not r["sites"])
    recorded = {r["family"]: r["model"] for r in BUILT if r["library"] == "timm"}
    for module in ("resnet", "eva", "metaformer"):
        assert census._smallest(timm.list_models(module=module))[0] == recorded[module]


def test_docs_table_is_the_census_json():
    rows = json.loads(RESULT.read_text())
    table = _census().markdown(rows)
    assert table in (ROOT / "docs" / "models.md").read_text()
    totals = {}
    for library in ("timm", "transformers"):
        mine = [r for r in rows if r["library"] == library]
        sites = sum(r["sites"] for r in mine)
        totals[library] = sum(_census()._skipping(r["sites"], r["runs"]) for r in mine) / sites
    assert totals["timm"] >= 0.9 and totals["transformers"] >= 0.9, totals
    for r in BUILT:  # the table's checks column: ok everywhere
        assert r["eval_same"] and r["zero_same"] and r["branches_at_one"] == 0, r


def test_the_census_counts_sites_after_their_check():
    """The census counts what the step did, not what ``accelerate`` planned: before any training
    call every block is unchecked and no site counts as skipping; after one step that checks them
    all, every site does; a block whose check failed counts its sites on the mask, with its
    reason."""
    timm = require("timm")
    from droppath import accelerate, set_drop_rates
    from droppath._derive.state import block_state
    from droppath.acceleration import accelerated_blocks

    census = _census()
    model = timm.create_model("test_vit", pretrained=False, drop_path_rate=0.1)
    report = accelerate(model)
    planned = report.counts()["row subset"]
    assert planned == 12
    row = census.Family("timm", "vision_transformer", "test_vit")
    census._account(row, model, report)
    assert row.runs == {"unchecked": 12} and census._skipping(row.sites, row.runs) == 0
    set_drop_rates(model, 0.1, "uniform")
    census._step(model, torch.randn(2, 3, 160, 160))
    census._account(row, model, report)
    assert row.runs == {"row subset": 12} and census._skipping(row.sites, row.runs) == 12
    block_state(accelerated_blocks(model)[1]).failed = "verify: planted failure 0.5"
    census._account(row, model, report)
    assert row.runs == {"row subset": 10, "mask": 2}, row.runs
    assert row.reasons == {"Block: verify: planted failure N": 2}, row.reasons


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
