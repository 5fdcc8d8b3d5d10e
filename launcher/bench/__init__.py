"""The benchmarks and studies behind `pfc bench` (the commands are in ``launcher/commands/``).

* `pfc bench head`: :mod:`.head_step` (the timed steps on every rank, and the run that spawns the
  ranks), :mod:`.gemm_floor` (the three matmuls a step cannot avoid: the floor the step is set
  against), :mod:`.head_memory` (each rank's peak memory), :mod:`.head_build` (the head and optimizer
  built by the trainer's rules, and one step of K micro-batches), :mod:`.head_results` (the ranks merged
  into the result, and its summary).
* `pfc bench train`: :mod:`.train_speed` (images/s of a real run, and the backbone-alone floor).
* `pfc bench discface` and `pfc bench augment`: :mod:`.discface_study`, :mod:`.augment_study`;
  the training runs they (and `pfc bench train`) start, and what they read back: :mod:`.study_runs`.

The loader benchmark (`pfc bench data`) lives with the loaders, in ``data_pipeline``.
"""
