"""Each use case's parameter file builds its model, loss, optimiser and sampler offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.data.sampling import build_sampler
from workbench.models.factory import build_model
from workbench.params import load_params
from workbench.train.losses import build_loss
from workbench.train.optim import build_param_groups, build_scheduler

PARAMS = Path(__file__).resolve().parents[2] / "params"
S2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
RECIPES = {
    # file: (band names, modality per band)
    "cryosentinel": ([*S2, "VV", "VH", "DEM"], ["S2L2A"] * 12 + ["S1GRD"] * 2 + ["DEM"]),
    "impactmesh_flood": (  # four time steps of S2L2A, S1RTC and DEM
        [f"{band}_t{k}" for k in range(4) for band in [*S2, "VV", "VH", "DEM"]],
        [f"{mod}_t{k}" for k in range(4) for mod in ["S2L2A"] * 12 + ["S1RTC"] * 2 + ["DEM"]],
    ),
    "thaw_slumps": (["red", "green", "blue"], ["RGB"] * 3),
    "cloud38": (["red", "green", "blue", "nir"], ["L8"] * 4),
    "landslide4sense": ([f"B{i}" for i in range(1, 13)] + ["slope", "DEM"], ["S2"] * 12 + ["slope", "DEM"]),
    "demo": ([*S2, "VV", "VH", "DEM"], ["S2L2A"] * 12 + ["S1GRD"] * 2 + ["DEM"]),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_and_takes_a_training_step(name: str) -> None:
    # TerraMind large/base are swapped for tiny: the wiring is what is tested, not the size
    params = load_params(PARAMS / f"{name}.yaml", ["model.terramind.size=tiny", "model.terramind.tap_indices=null"])
    bands, modalities = RECIPES[name]
    if params.data.bands is not None:
        assert params.data.bands == bands[: len(params.data.bands)]
    torch.manual_seed(0)
    model = build_model(params.model, len(bands), bands, modalities)
    size = 64
    image = torch.randn(2, len(bands), size, size)
    logits = model(image)
    assert logits.shape == (2, params.model.num_classes, size, size)
    target = (image[:, :1, :, :].squeeze(1) > 0.5).float()
    mask = torch.ones_like(target, dtype=torch.bool)
    loss, parts = build_loss(params.train.loss, data_pos_weight=20.0)(logits, target, mask)
    assert torch.isfinite(loss) and set(parts) == {term.name for term in params.train.loss}
    groups = build_param_groups(
        model, params.train.optimizer, getattr(model, "backbone_prefix", "encoder"), model.num_backbone_layers
    )
    optimizer = torch.optim.AdamW(groups, lr=params.train.optimizer.lr)
    build_scheduler(optimizer, params.train.optimizer, steps_per_epoch=4, max_epochs=params.train.max_epochs)
    loss.backward()
    optimizer.step()
    sampler = build_sampler(params.data.sampler, np.linspace(0, 0.02, 50), seed=params.seed)
    if params.data.sampler.kind != "random":
        assert sampler is not None and len(list(iter(sampler))) > 0
