import pytest


@pytest.fixture(scope="session")
def mnist1d_cache(request, tmp_path_factory):
    """A cache directory for the generated MNIST-1D arrays that persists across test sessions
    (pytest's cache folder): generated once per checkout (the loader checks the fingerprint on
    every load), never in the user's ~/.cache. Without the cache plugin (``-p
    no:cacheprovider``), a temporary directory for this session."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return str(tmp_path_factory.mktemp("curvlab-mnist1d"))
    return str(cache.mkdir("curvlab-mnist1d"))
