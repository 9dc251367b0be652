"""Test tiers (pyproject.toml's markers; `make test-fast` runs the first two):

  unit         no model at all;
  tiny         tiny random models from configs and planted ones, in this process;
  slow         end to end: subprocesses, torchrun, SIGKILL, the whole planted comparison;
  integration  the bundled models (SmolLM2-135M, all-MiniLM-L6-v2).

A test that takes a fixture below gets that fixture's tier without saying so.
"""

import os
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach the Hub: fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("LMPRUNE_DATA_DIR", str(SHARED_DATA))


FIXTURE_TIERS = {"smollm2": "integration", "compared": "slow"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture in FIXTURE_TIERS.keys() & set(item.fixturenames):
            item.add_marker(FIXTURE_TIERS[fixture])


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (converted once to the safetensors cache)."""
    from lmprune.core.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread when other work shares the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
