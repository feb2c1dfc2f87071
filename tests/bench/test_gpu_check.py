"""The GPU check: a clear exit without CUDA, and the measuring code's report structure on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.bench import gpu

REPO = Path(__file__).resolve().parents[2]


def test_script_exits_clearly_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--reports", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == gpu.EXIT_NO_CUDA, done.stderr
    assert "no CUDA device is visible" in done.stderr
    assert not (tmp_path / "bench").exists()


def test_main_without_cuda_returns_the_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == gpu.EXIT_NO_CUDA
    assert "nothing was measured" in capsys.readouterr().err


def test_measure_on_cpu_writes_a_complete_report(tmp_path: Path) -> None:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=1, decoder_channels=(8,), in_channels=4, classes=2)
    results = gpu.measure(
        model, 4, 2, device="cpu", batch_size=2, size=32, steps=2, warmup=1, raster=64, window=32, stride=16
    )
    path = gpu.write_report({"environment": gpu.environment(torch.device("cpu")), "results": results}, tmp_path)
    assert path.parent == tmp_path / "bench" and path.name.startswith("gpu-") and path.suffix == ".json"
    report = json.loads(path.read_text())
    for precision in ("bf16", "fp32"):
        train, infer = report["results"][precision]["train"], report["results"][precision]["infer"]
        assert train["steps"] == 2 and train["input_shape"] == [2, 4, 32, 32]
        for value in (train["it_per_s"], train["samples_per_s"], train["peak_memory_mb"], train["seconds"]):
            assert 0 < value < float("inf")
        assert train["samples_per_s"] == pytest.approx(2 * train["it_per_s"])
        assert infer["windows"] == 9 and infer["batches"] == 5  # 3 x 3 windows of 32 over 64 px, stride 16
        for value in (infer["it_per_s"], infer["windows_per_s"], infer["peak_memory_mb"]):
            assert 0 < value < float("inf")
        assert infer["finite_fraction"] == 1.0
    assert set(report["results"]["bf16_speedup"]) == {"train", "infer"}
    assert report["results"]["bf16_speedup"]["train"] > 0


@pytest.mark.slow
def test_recipe_model_builds_and_runs_one_step_on_cpu() -> None:
    """The check's TerraMind path stays valid as the project changes (CI never runs the script on a GPU)."""
    model, in_channels, num_classes, recipe = gpu.build_recipe_model(gpu.RECIPE, ["model.terramind.size=tiny"])
    assert in_channels == 60  # four time steps of S2L2A (12) + S1RTC (2) + DEM (1)
    assert recipe["timesteps"] == 4 and recipe["batch_size"] == 16 and "random" in recipe["weights"]
    results = gpu.measure(
        model,
        in_channels,
        num_classes,
        device="cpu",
        precisions=("bf16",),
        batch_size=1,
        size=32,
        steps=1,
        warmup=0,
        raster=32,
        window=32,
        stride=32,
    )
    assert results["bf16"]["train"]["it_per_s"] > 0
    assert results["bf16"]["infer"]["windows"] == 1 and results["bf16"]["infer"]["finite_fraction"] == 1.0
