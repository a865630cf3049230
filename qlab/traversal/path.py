"""Choosing between the relay and the direct path (TraversalConfig, PathManager)."""

from __future__ import annotations
