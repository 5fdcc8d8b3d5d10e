"""`pfc plan`: memory per rank and traffic per step of the Partial FC head, for runs of any size."""

from __future__ import annotations

from pathlib import Path

import typer

from launcher.commands.groups import app
from launcher.commands.output import write_json
from launcher.planner import (
    DEFAULT_WORLDS,
    DTYPE_BYTES,
    RankPlan,
    human_bytes,
    parse_worlds,
    plan_rank,
    plan_table,
)


def _breakdown(plan: RankPlan) -> list[tuple[str, str]]:
    rows = [(name.replace("_", " "), human_bytes(v)) for name, v in plan.memory.items()]
    rows.append((f"TOTAL per rank (peak in the {plan.peak_phase.replace('_', ' ')})",
                 human_bytes(plan.total_bytes)))
    rows.append(("", ""))
    rows += [(f"sent: {name.replace('_', ' ')}", human_bytes(v)) for name, v in plan.comm.items()]
    rows.append(("sent per step per rank", human_bytes(plan.comm_bytes_per_step)))
    return rows


def _table_rows(plans: list[RankPlan], chosen: int) -> list[list[str]]:
    out = []
    for p in plans:
        m = p.memory
        logits = m.get("logits_and_grad", 0)
        rows_sd = p.total_bytes - p.shard_weights_plus_momentum_bytes - logits - m.get("embeddings", 0)
        out.append([
            f"{p.world_size}{' *' if p.world_size == chosen else ''}",
            f"{p.shard_rows:,}",
            f"{p.num_sample_planned or p.num_sample:,}",
            human_bytes(p.shard_weights_plus_momentum_bytes),
            human_bytes(rows_sd),
            human_bytes(logits),
            human_bytes(m.get("embeddings", 0)),
            human_bytes(p.total_bytes),
            p.peak_phase.replace("_", " "),
            human_bytes(p.comm_bytes_per_step),
        ])
    return out


_HEADERS = ["W", "rows", "sampled", "W+mom", "S x D bufs", "logits", "embeds", "total", "peak in", "sent/step"]
_LEGEND = ("rows: classes in the largest shard; sampled: classes per step the buffers are sized for (the "
           "quota, or the step's positives when they are more); W+mom: shard weights + momentum; "
           "S x D bufs: the step's sampled rows and their gradient, the momentum chunk, the sampler's "
           "scratch and the owned samples' rows at the peak; logits: the N x sampled fp32 logits and their "
           "gradient; embeds: gathered and local embeddings with gradients; peak in: the phase of the step "
           "that sets the peak; sent/step: bytes this rank sends per step (ring algorithms)")


def _print_human(plan: RankPlan, table: list[RankPlan]) -> None:
    title = (f"C={plan.num_classes:,}  W={plan.world_size}  B={plan.local_batch}/rank (N={plan.global_batch})  "
             f"D={plan.dim}  r={plan.sample_rate}  dtype={plan.dtype}  optimizer={plan.optimizer}"
             + (f"  rounding={plan.rounding}" if plan.dtype in ("bf16", "fp16") else ""))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich comes with typer, but plain text keeps working without it
        typer.echo(title)
        for k, v in _breakdown(plan):
            typer.echo(f"  {k:<44} {v:>14}")
        typer.echo("  ".join(_HEADERS))
        for row in _table_rows(table, plan.world_size):
            typer.echo("  ".join(row))
        typer.echo(_LEGEND)
        return
    console = Console(width=max(Console().width, 150))
    detail = Table(title=title, show_header=False)
    detail.add_column("part")
    detail.add_column("bytes", justify="right")
    for k, v in _breakdown(plan):
        detail.add_row(k, v)
    console.print(detail)
    across = Table(title="Across world sizes (per rank; * = --world-size)")
    for h in _HEADERS:
        across.add_column(h, justify="right")
    for row in _table_rows(table, plan.world_size):
        across.add_row(*row)
    console.print(across)
    console.print(_LEGEND)
    if plan.num_sample_planned > plan.num_sample:
        console.print(f"note: a step's positives in the largest shard (about {plan.num_sample_planned} for "
                      f"labels spread evenly over the classes) exceed the sampling quota {plan.num_sample}: "
                      "every positive is kept, and the plan is sized for them")
    if plan.num_sample_worst > max(plan.num_sample, plan.num_sample_planned):
        console.print(f"note: labels that crowd into one shard (a dataset whose identities differ much in size) "
                      f"can keep up to {plan.num_sample_worst} classes there, more than the "
                      f"{max(plan.num_sample, plan.num_sample_planned)} planned")


@app.command("plan")
def plan_cmd(
    classes: int = typer.Option(..., "--classes", min=1, help="Number of classes C."),
    world_size: int = typer.Option(..., "--world-size", min=1, help="Ranks W."),
    batch: int = typer.Option(..., "--batch", min=1, help="Local batch B per rank."),
    dim: int = typer.Option(512, "--dim", min=1, help="Embedding size D."),
    sample_rate: float = typer.Option(1.0, "--sample-rate", min=0.0, max=1.0, help="Sample rate r in (0, 1]."),
    dtype: str = typer.Option("fp32", "--dtype", help="Head dtype: " + "|".join(DTYPE_BYTES)),
    worlds: str = typer.Option(",".join(map(str, DEFAULT_WORLDS)), "--worlds",
                               help="World sizes for the table, comma-separated."),
    discface: bool = typer.Option(True, "--discface/--no-discface",
                                  help="Count DiscFace's all-reduces (a scalar and b's gradient)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="Head optimizer (optim.name): sgd|adamw."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per step (optim.grad_accum)."),
    device: str = typer.Option("cuda", "--device",
                               help="cuda|cpu: the device the ranks train on (the head's scratch chunks are a "
                                    "few hundred MiB on a GPU, a few MiB on the CPU)."),
    rounding: str = typer.Option("stochastic", "--rounding",
                                 help="stochastic|nearest (head.rounding): how a bf16/fp16 head stores its updates; "
                                      "stochastic rounding's noise is counted."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the plan as JSON here."),
) -> None:
    """Memory and communication per rank for a run, across world sizes."""
    try:
        world_list = parse_worlds(worlds)
        plan = plan_rank(classes, world_size, batch, dim, sample_rate, dtype, discface, optimizer, grad_accum,
                         device, rounding)
        table = plan_table(classes, [*world_list, world_size], batch, dim, sample_rate, dtype, discface,
                           optimizer, grad_accum, device, rounding)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    _print_human(plan, table)
    write_json(json_path, {"plan": plan.to_dict(), "table": [p.to_dict() for p in table],
                           "model": "launcher/planner.py (ring-algorithm bytes sent; largest shard's memory)"},
               announce=True)
