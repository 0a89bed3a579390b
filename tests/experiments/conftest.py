import pytest


@pytest.fixture(scope="session")
def mnist1d_cache(request):
    """A cache directory for the generated MNIST-1D arrays that persists across test sessions
    (pytest's cache folder): generated once per checkout (the loader checks the fingerprint on
    every load), never in the user's ~/.cache."""
    return str(request.config.cache.mkdir("curvlab-mnist1d"))
