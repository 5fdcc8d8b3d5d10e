"""Prometheus exporter for training (placeholder until issue 7 lands: every call is a no-op)."""

from __future__ import annotations

from typing import Any

from launcher.config import MetricsConfig


class TrainingMetrics:
    def __init__(self, cfg: MetricsConfig, *, rank: int, local_rank: int, node: int, world_size: int) -> None:
        self.cfg = cfg

    def start(self) -> None:
        return None

    def observe_step(self, step: int, scalars: dict[str, float], *, images: int, sampled_classes: int,
                     skipped_records: int) -> None:
        return None

    def observe_discrepancy(self, stats: dict[str, float]) -> None:
        return None

    def observe_eval(self, results: dict[str, dict[str, Any]]) -> None:
        return None

    def observe_checkpoint(self, seconds: float) -> None:
        return None

    def close(self) -> None:
        return None
