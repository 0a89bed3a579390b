"""Runners and studies: training loop, models, data (importable as ``curvlab.experiments``)."""
