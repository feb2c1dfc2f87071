"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from workbench.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_fakes() -> ModuleType:
    """tests/fakes.py (generators of small files in the real layouts), imported once."""
    if "eo_fakes" in sys.modules:
        return sys.modules["eo_fakes"]
    spec = importlib.util.spec_from_file_location("eo_fakes", Path(__file__).parent / "fakes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["eo_fakes"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of small real samples beside the repository; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    """Keep torch to the CI machine's two cores."""
    import torch

    torch.set_num_threads(2)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one torch thread (deterministic CPU kernels, no oversubscription)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_demo_params(store: Path, *extra: str) -> Params:
    """Demo parameters shrunk to seconds of training: 48 chips of 32 px, a narrow SatUNet, 1 epoch."""
    return load_params(
        REPO / "params" / "demo.yaml",
        [
            f"data.store={store}",
            "data.synthetic.n_chips=48",
            "data.synthetic.chip_size=32",
            "data.batch_size=8",
            "model.architecture=satunet",
            "model.base_channels=8",
            "train.max_epochs=1",
            "train.progress_bar=false",
            "train.deterministic=true",
            *extra,
        ],
    )
