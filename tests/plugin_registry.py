"""A method registry that a test may fill with plugins and that is restored afterwards, so a plugin
registered in one test is never seen by another (tests/test_registry.py checks the built-in set)."""

import copy

import pytest

from booster_jax import config, plugins
from booster_jax.methods import base


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(base, "METHODS", dict(base.METHODS))
    monkeypatch.setattr(config, "EXTENSION_METHODS", copy.deepcopy(config.EXTENSION_METHODS))
    monkeypatch.setattr(config, "EXTENSION_SECTIONS", copy.deepcopy(config.EXTENSION_SECTIONS))
    monkeypatch.setattr(config, "EXTENSION_SOURCES", set(config.EXTENSION_SOURCES))
    monkeypatch.setattr(config, "_SCHEMAS", {})
    monkeypatch.setattr(plugins, "_loaded", {})
    monkeypatch.setattr(plugins, "_entry_points_problems", None)
    yield
