import gin
import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_gin_and_seed():
    """gin is global: clear it around every test; seed for reproducible random models."""
    gin.clear_config()
    torch.manual_seed(0)
    yield
    gin.clear_config()
