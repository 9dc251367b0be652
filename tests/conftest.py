import os
from pathlib import Path

import pytest

# Nothing in the tests may reach the Hub: fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("LMPRUNE_DATA_DIR", str(SHARED_DATA))


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (converted once to the safetensors cache)."""
    from lmprune.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")
