"""The head `pfc bench head` times, built as training builds it, and one optimizer step of it.

The settings users turn on in a run's config are the benchmark's options, with the config's names and
choices (:func:`setting_choices`): ``head.dtype`` (fp32, bf16, fp16: the storage of the shard and its
SGD momentum), ``optim.name`` (sgd, adamw) and ``optim.grad_accum`` (K micro-batches per optimizer step).
The head and its optimizer are built by the trainer's own rules (:data:`launcher.trainer.components.HEAD_DTYPES`
and :meth:`partialfc.PartialFC.make_optimizer` with the config's default hyper-parameters), so that the
benchmark measures what a run holds, not a copy that may drift from it.

A step of K micro-batches is the trainer's (:func:`launcher.trainer.step.train_one_step`): one
``head.begin_step`` with the labels of all K (one sampled set, one accumulated gradient of its rows), K
forward + backward of ``loss / K``, then the optimizer's step.
"""

from __future__ import annotations

import time
from typing import Any, get_args

from launcher.bench.gemm_floor import sync
from launcher.bench.head_memory import PhasePeaks


def setting_choices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(head dtypes, head optimizers) the config accepts: ``head.dtype``'s and ``optim.name``'s choices."""
    from launcher.config_schema import HeadConfig, OptimConfig

    return (get_args(HeadConfig.model_fields["dtype"].annotation),
            get_args(OptimConfig.model_fields["name"].annotation))


def optimizer_hyper_parameters(name: str) -> dict[str, Any]:
    """The keyword arguments the trainer gives ``head.make_optimizer`` under the config's defaults
    (:func:`launcher.trainer.components.head_optimizer_kwargs`)."""
    from launcher.config_schema import OptimConfig
    from launcher.trainer.components import head_optimizer_kwargs

    return head_optimizer_kwargs(OptimConfig(name=name))  # type: ignore[arg-type]  # checked against setting_choices()


def build_head(num_classes: int, dim: int, sample_rate: float, discface_lambda: float, seed: int,
               head_dtype: str, optimizer: str, device: Any) -> tuple[Any, Any]:
    """This rank's head (its shard of ``num_classes`` x ``dim`` in ``head_dtype``, on ``device``) and its
    optimizer (``optimizer``, with the trainer's default hyper-parameters)."""
    from launcher.trainer.components import HEAD_DTYPES
    from partialfc import PartialFC

    # Built on the device directly, as the trainer does: no CPU copy of the shard.
    head = PartialFC(num_classes, dim, sample_rate=sample_rate, discface_lambda=discface_lambda, seed=seed,
                     dtype=HEAD_DTYPES[head_dtype], device=device)
    return head, head.make_optimizer(**optimizer_hyper_parameters(optimizer))


def one_step(head: Any, opt: Any, embeddings: Any, labels: Any, phases: PhasePeaks | None,
             device: Any) -> tuple[float, float, float, float, int, float]:
    """One optimizer step over the K micro-batches of ``labels`` (K, B): forward, backward and the
    optimizer's step, each phase timed alone (summed over the micro-batches) and its memory peak
    recorded in ``phases`` (when given). ``embeddings`` (B, D) is every micro-batch's input: a leaf
    standing in for the backbone's output, whose gradient accumulates over the micro-batches.

    Returns (forward s, backward s, optimizer s, CPU s of the three, sampled classes, mean loss).
    """
    k = int(labels.shape[0])
    fwd = bwd = cpu = loss_sum = 0.0
    c0, t0 = time.process_time(), time.perf_counter()
    if k > 1:
        # The step's one sampled set, from the labels of all its micro-batches (the forward's work when K = 1).
        head.begin_step(list(labels))
    for micro in range(k):
        if micro:
            c0, t0 = time.process_time(), time.perf_counter()
        loss = head(embeddings, labels[micro])
        sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        if phases is not None:
            phases.end("forward")
        c2, t2 = time.process_time(), time.perf_counter()
        (loss / k if k > 1 else loss).backward()  # accumulation averages the loss, as the trainer does
        sync(device)
        t3, c3 = time.perf_counter(), time.process_time()
        if phases is not None:
            phases.end("backward")
        fwd, bwd, cpu = fwd + t1 - t0, bwd + t3 - t2, cpu + (c1 - c0) + (c3 - c2)
        loss_sum += float(loss.detach())
    # Only the count: holding the returned ids would keep them alive into the next step.
    n_sampled = int(head.weight_grad()[0].numel())
    c4, t4 = time.process_time(), time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    embeddings.grad = None
    sync(device)
    t5, c5 = time.perf_counter(), time.process_time()
    if phases is not None:
        phases.end("optimizer")
    return fwd, bwd, t5 - t4, cpu + (c5 - c4), n_sampled, loss_sum / k
