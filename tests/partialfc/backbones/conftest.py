"""Fixtures for the backbone tests."""

from __future__ import annotations



