"""Helpers shared by the tests: random trees and dense references."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import jaxlora


def randomize_b(delta, key, scale=0.1):
    """A copy of ``delta`` whose ``b`` factors are random (they start at zero)."""
    leaves, treedef = jax.tree.flatten(delta, is_leaf=is_node)
    out = []
    for i, node in enumerate(leaves):
        if is_node(node):
            b = scale * jax.random.normal(jax.random.fold_in(key, i), node.b.shape, node.b.dtype)
            node = dataclasses.replace(node, b=b)
        out.append(node)
    return treedef.unflatten(out)


def is_node(x):
    return isinstance(x, jaxlora.LoraNode)


def dense_merge(weight, node, sign=1.0):
    """``W + s·a@b`` in float64 numpy, reshaped to the weight's shape."""
    a = np.asarray(node.a, np.float64)
    b = np.asarray(node.b, np.float64)
    delta = float(node.scale) * np.matmul(a, b)
    return np.asarray(weight, np.float64) + sign * delta.reshape(np.shape(weight))
