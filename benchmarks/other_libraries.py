"""``accelerate`` and ``check`` on libraries beyond timm, torchvision and transformers.

    pip install --no-deps --target DIR monai sam2 hydra-core iopath omegaconf \\
        "antlr4-python3-runtime==4.9.3" portalocker
    PYTHONPATH=DIR python benchmarks/other_libraries.py

Builds MONAI's ``SwinUNETR`` (its only network with a drop-path rate) and SAM 2's Hiera
backbone small, with random weights, accelerates each and checks every block on one example
batch; prints, per model, its sites, how the report says they run, and how many blocks passed
their check (the table "Other libraries" of ``docs/models.md``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from droppath import accelerate, check


def probe(name: str, model: nn.Module, x: torch.Tensor) -> None:
    report = accelerate(model, 0.2)
    states = check(model, x)
    verified = sum(s == "verified" for s in states.values())
    failed = sorted({s.split(" (")[0][:120] for s in states.values() if s != "verified"})
    print(f"{name}: {len(report)} sites {report.counts()}; {verified} of {len(states)} blocks")
    print(f"  checked; not verified: {failed}" if failed else "  checked")


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    from monai.networks.nets import SwinUNETR

    swin = SwinUNETR(
        in_channels=1,
        out_channels=2,
        feature_size=12,
        num_heads=(1, 1, 1, 1),
        spatial_dims=2,
        dropout_path_rate=0.2,
    )
    probe("MONAI SwinUNETR (2-D)", swin, torch.randn(2, 1, 64, 64))
    from sam2.modeling.backbones.hieradet import Hiera

    hiera = Hiera(
        embed_dim=16,
        num_heads=1,
        stages=(1, 2, 2, 1),
        global_att_blocks=(),
        window_pos_embed_bkg_spatial_size=(4, 4),
        window_spec=(4, 4, 4, 4),
        drop_path_rate=0.2,
    )
    probe("SAM 2 Hiera", hiera, torch.randn(2, 3, 64, 64))


if __name__ == "__main__":
    main()
