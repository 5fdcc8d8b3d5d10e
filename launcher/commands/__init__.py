"""The `pfc` commands, one module per command group; each registers its commands on an app of
:mod:`launcher.commands.groups` when :mod:`launcher.cli` imports it.

train.py (train, demo) | data.py (data pack/inspect/pairs/synth) | benchmarks.py (bench data/head/train/
discface/augment) | evaluate.py (eval) | export.py (export onnx/torch, embed) | plan.py | report.py |
env.py | show_config.py (config show) | output.py: the ``--json PATH`` writer and user error -> exit 2,
shared by all of them.
"""
