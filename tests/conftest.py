from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def parity():
    """The public code's outputs on a small random UNITER (FACTS 3.5)."""
    return torch.load(FIXTURES / "uniter_parity.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
