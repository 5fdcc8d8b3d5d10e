"""What a run tells the outside: exporter.py (Prometheus ``/metrics`` per rank; its names and labels in
series.py, what is read at scrape time in scrape.py), trackers.py (TensorBoard and W&B, beside the
``metrics.jsonl`` that ``launcher.trainer.progress`` writes) and plots.py (`pfc report`'s PNGs from
``metrics.jsonl``)."""
