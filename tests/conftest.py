import gin
import pytest
import torch

# The test models are tiny: one intra-op thread is as fast, and it avoids OpenMP spin-waiting
# when the 2 cores are shared with other processes (measured: 10x slower otherwise).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_gin_and_seed():
    """gin is global: clear it around every test; seed for reproducible random models."""
    gin.clear_config()
    torch.manual_seed(0)
    yield
    gin.clear_config()
