"""Shared test configuration.

Warnings are errors (pyproject). Rank promotion stays allowed: Flax's own
layers broadcast biases with it.
"""

import jax
import pytest


@pytest.fixture
def key():
    return jax.random.key(0)
