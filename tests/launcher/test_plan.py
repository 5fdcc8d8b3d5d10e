"""`pfc plan` and launcher/planner.py: the memory and traffic model on hand-computed cases."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from launcher.planner import num_sample, parse_worlds, plan_rank, plan_table, shard_rows


def test_partition_and_quota_by_hand() -> None:
    assert shard_rows(10, 3) == 4          # torch.chunk: 4, 4, 2
    assert shard_rows(10, 4) == 3          # 3, 3, 3, 1
    assert shard_rows(12, 4) == 3
    assert num_sample(30, 0.1) == 3        # 0.1 * 30 is 3.0000000000000004 in floating point
    assert num_sample(31, 0.1) == 4
    assert num_sample(500_000, 0.1) == 50_000
    assert num_sample(7, 1.0) == 7
    assert num_sample(1, 0.01) == 1
    with pytest.raises(ValueError, match="sample_rate"):
        num_sample(10, 0.0)
    with pytest.raises(ValueError, match="num_classes and world_size"):
        shard_rows(0, 2)


def test_planner_rules_are_the_heads() -> None:
    """The planner counts with the head's own partition and quota rules (partialfc.partition): same values."""
    from partialfc.partition import class_range
    from partialfc.partition import num_sample as head_num_sample

    for c in (1, 5, 10, 999, 1000, 12_345):
        for w in (1, 2, 3, 4, 7, 8):
            largest = max(e - s for s, e in (class_range(c, w, k) for k in range(w)))
            assert shard_rows(c, w) == largest, (c, w)
    for rows in (1, 3, 29, 30, 31, 100, 12_345, 500_000):
        for r in (0.01, 0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0):
            assert num_sample(rows, r) == head_num_sample(rows, r), (rows, r)


def test_memory_hand_computed_fp32() -> None:
    # C=1000, W=3 -> 334 rows; r=0.5 -> S=167 (a step's N=6 labels cannot outnumber the quota); B=2; D=4; fp32.
    p = plan_rank(1000, 3, 2, 4, 0.5, "fp32", discface=True)
    assert (p.shard_rows, p.num_sample, p.num_sample_planned, p.global_batch) == (334, 167, 167, 6)
    sd, ns = 167 * 4 * 4, 6 * 167 * 4                   # S x D fp32 = 2672, N x S fp32 = 4008
    emb = 3 * 6 * 4 * 4 + 2 * 2 * 4 * 4                 # 3 N x D fp32 + 2 B x D = 352
    # head.record's owned samples, a z_hat and a w_hat row each: the shard expects 2 of the 6, plus four
    # standard deviations, at most N = 6; the last step's and this step's at the end of a forward.
    owned = 2 * 6 * 4 * 4
    # The reused workspace: logits and their gradient (2 N x S), the rows' copy and gradient (2 S x D)
    # and a momentum chunk (min(S, 512) rows = S x D here); the sampler's 48 bytes per shard row (r = 0.5: a
    # permutation of the negatives); the backward's row-dot scratch block (min(S, 1 MiB of rows) = S x D here);
    # the sampled rows' (S,) int64 local index.
    ws = 2 * ns + 2 * sd + sd + 167 * 8
    assert p.phases == {"forward": ws + 48 * 334 + emb + 2 * owned, "backward": ws + emb + owned + sd,
                        "optimizer": ws + owned}
    assert p.peak_phase == "forward"
    assert p.memory["shard_weights"] == p.memory["momentum"] == 334 * 4 * 4
    assert p.shard_weights_plus_momentum_bytes == 10_688
    assert p.total_bytes == 10_688 + 17_368 + 16_032 + 352 + 384 == 44_824
    assert p.step_bytes == 34_136


def test_the_samplers_scratch_follows_its_path() -> None:
    """Measured resident-set peaks of sample_classes (10M-row shard, CPU): 6.8 bytes/row at r = 0.1 (i.i.d.
    draws), 48 at r = 0.3 (a permutation of the negatives: it was counted as 8), 8.1 at r = 1 (arange)."""
    rows = 10_000_000
    for r, per_row in ((0.1, 8), (0.3, 48), (0.5, 48), (1.0, 8)):
        p = plan_rank(2 * rows, 2, 8, 4, r, "fp32")
        assert p.shard_rows == rows
        sampler = p.phases["forward"] - p.phases["optimizer"]
        emb = 3 * 16 * 4 * 4 + 2 * 8 * 4 * 4
        owned = 2 * 16 * 4 * 4  # the forward holds one more step's owned rows (all N = 16 at most)
        assert sampler - emb - owned == per_row * rows, (r, sampler - emb - owned)


def test_memory_large_logits_and_half_precision() -> None:
    # N x S dominates when N is large; the momentum chunk is capped at 512 rows. The peak is the forward's:
    # the owned samples of two steps (4 x 1115 rows of D = 8) and the sampler's arange outweigh the backward's
    # row-dot scratch (S x D). Owned: 1024 of the 2048 samples expected in the shard, plus four standard
    # deviations (4 sqrt(2048 / 4) = 90.5).
    p = plan_rank(1000, 2, 1024, 8, 1.0, "fp32")
    s, n = 500, 2048
    assert p.peak_phase == "forward"
    assert p.total_bytes == 2 * 500 * 8 * 4 + 2 * n * s * 4 + 3 * s * 8 * 4 + 8 * 500 \
        + 3 * n * 8 * 4 + 2 * 1024 * 8 * 4 + 4 * 1115 * 8 * 4 + 8 * s  # (S,) int64 sampled index
    assert plan_rank(10_000_000, 2, 8, 4, 0.5).memory["optimizer_chunks"] == 512 * 4 * 4
    # fp16: the shard and its momentum halve; the head works on a reused fp32 copy of the sampled rows
    # (gathered in fp16 first, into the bytes of the not yet written fp32 gradient buffer: nothing more)
    # and updates in fp32 chunks staged through two fp16 chunks (momentum and weights).
    h = plan_rank(1000, 3, 2, 4, 0.5, "fp16")
    sd_f, sd_e, ns = 167 * 4 * 4, 167 * 4 * 2, 6 * 167 * 4
    noise = 167 * 4 * 4  # the int32 chunk of stochastic-rounding noise (a bf16/fp16 head's default)
    ws = 2 * ns + sd_f + sd_f + (sd_f + 2 * sd_e + noise) + 167 * 8  # and the (S,) int64 sampled index
    emb = 3 * 6 * 4 * 4 + 2 * 2 * 4 * 2
    owned = 2 * 6 * 4 * 4
    assert h.memory["shard_weights"] == h.memory["momentum"] == 334 * 4 * 2
    assert sd_e == sd_f // 2  # the fp16 gather fits in the fp32 gradient buffer
    assert h.phases == {"forward": ws + 48 * 334 + emb + 2 * owned, "backward": ws + emb + owned + sd_f,
                        "optimizer": ws + owned + 32 * 167}  # r = 0.5; stochastic rounding draws 32 B per row
    assert h.total_bytes == 2 * 334 * 4 * 2 + h.phases["forward"]


def test_memory_adamw_and_grad_accum() -> None:
    # AdamW: fp32 moments (2 x rows x D x 4) and int64 per-row steps, even for a bf16 head; its chunks are
    # m, v and the denominator in fp32 plus one bf16 staging chunk for the weights and an int32 one of
    # stochastic-rounding noise.
    a = plan_rank(1000, 3, 2, 4, 0.5, "bf16", optimizer="adamw")
    assert a.memory["adamw_moments"] == 2 * 334 * 4 * 4 and a.memory["adamw_row_steps"] == 334 * 8
    assert "momentum" not in a.memory
    assert a.shard_weights_plus_momentum_bytes == 334 * 4 * 2 + 2 * 334 * 4 * 4 + 334 * 8
    assert a.memory["optimizer_chunks"] == 3 * 167 * 4 * 4 + 167 * 4 * 2 + 167 * 4 * 4
    # SGD in bf16 is half the fp32 shard + momentum: twice the classes fit.
    assert plan_rank(10, 1, 2, 4, 1.0, "bf16").shard_weights_plus_momentum_bytes * 2 == \
        plan_rank(10, 1, 2, 4, 1.0, "fp32").shard_weights_plus_momentum_bytes
    # grad_accum = 3: a second S x D gradient buffer; traffic per micro-batch plus the step's labels once.
    one, three = plan_rank(1000, 2, 2, 4, 0.5), plan_rank(1000, 2, 2, 4, 0.5, grad_accum=3)
    assert one.num_sample_planned == three.num_sample_planned == 250
    assert three.memory["sampled_weights_grad"] == 2 * one.memory["sampled_weights_grad"]
    assert three.comm_bytes_per_step == 3 * one.comm_bytes_per_step + 8 + 3 * 2 * 8
    # and a step that measures the discrepancy keeps every micro-batch's owned samples (4 of the 4 samples of a
    # micro-batch at most, embedding and class row, D = 4, fp32): 3 in the backward, 3 + the last step's in the
    # forward, 3 + their merged copy before the optimizer step, against 1, 2 and 1
    owned_rows, sd_f = 2 * 4 * 4 * 4, 250 * 4 * 4
    assert {k: three.phases[k] - one.phases[k] for k in one.phases} == {
        "forward": sd_f + 2 * owned_rows, "backward": sd_f + 2 * owned_rows, "optimizer": sd_f + 5 * owned_rows}
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw"):
        plan_rank(10, 2, 2, 4, 0.5, optimizer="adam")


def test_positives_above_the_quota_size_the_buffers() -> None:
    """A step whose positives in a shard outnumber the quota keeps them all: the buffers hold that many rows.
    `pfc bench head` (C = 200k, B = 2048, D = 512, r = 0.001, one rank) kept 2030-2045 classes against a quota of
    200, and its peak was 6% above the plan sized with the quota (69% at B = 4096, D = 256, bf16)."""
    # One rank owns all 1000 classes: the step's 100 labels, uniform over them, are 1000 (1 - 0.999^100) = 95.2
    # distinct classes on average (no spread: every label lands in this shard); any labels could be 100.
    p = plan_rank(1000, 1, 100, 4, 0.01, "fp32")
    # S = 96 moves from step to step, and the CPU workspace keeps 5% over the largest it was asked for: 100 rows.
    assert p.memory["logits_and_grad"] == 2 * 100 * 100 * 4
    assert p.memory["sampled_weights"] == p.memory["sampled_weights_grad"] == 100 * 4 * 4
    assert (p.num_sample_planned, p.num_sample_worst) == (96, 100) and p.num_sample == 10
    # The owned samples: all 100 (one rank), a z_hat and a w_hat row each, two steps' at the forward's end.
    assert p.peak_phase == "forward" and p.memory["owned_samples"] == 2 * 2 * 100 * 4 * 4
    gpu = plan_rank(1000, 1, 100, 4, 0.01, "fp32", device="cuda")  # no reused workspace on a GPU
    assert gpu.memory["logits_and_grad"] == 2 * 100 * 96 * 4
    # Accumulation: ONE sampled set holds the positives of the step's 4 micro-batches, 400 labels:
    # 1000 (1 - 0.999^400) = 329.8 distinct on average, up to 400 for any labels.
    acc = plan_rank(1000, 1, 100, 4, 0.01, "fp32", grad_accum=4, device="cuda")
    assert (acc.num_sample_planned, acc.num_sample_worst) == (330, 400)
    assert acc.memory["logits_and_grad"] == 2 * 100 * 330 * 4
    # Two ranks of 500 classes: the shard gets 200 / 2 labels on average, spread sqrt(200 / 4) = 7.07; planned
    # at 500 (1 - 0.999^200) + 4 x 7.07 = 118.96 distinct classes.
    two = plan_rank(1000, 2, 100, 4, 0.01, "fp32", device="cuda")
    assert (two.num_sample_planned, two.num_sample_worst) == (119, 200) and two.num_sample == 5
    # At scale the quota is far above a shard's positives: nothing changes.
    big = plan_rank(2_000_000, 8, 128, 512, 0.1, "fp32", grad_accum=4, device="cuda")
    assert big.num_sample_planned == big.num_sample == 25_000


@pytest.mark.multiprocess
def test_plan_meets_the_benchmark_when_positives_exceed_the_quota(tmp_path) -> None:
    """Measured: `pfc bench head` (its own process, as users run it; ~4 s) on one rank of 50k classes with a
    global batch of 4096 uniform labels and r = 0.001 keeps ~3930 classes a step against a quota of 50. The plan
    sized with the quota was a third of the measured peak; sized with the positives it is within a few percent
    (below by up to the 5% workspace slack that a short run may not reach)."""
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "bench", "head", "--classes", "50000", "--dim", "128",
                          "--batch", "4096", "--sample-rate", "0.001", "--world-size", "1", "--steps", "2",
                          "--warmup", "1", "--floor", "after", "--threads", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    ratio = doc["planner"]["measured_over_planned_memory"]
    assert 0.93 <= ratio <= 1.03, (ratio, doc["head_peak_bytes_per_rank"], doc["planner"])
    kept = doc["num_sampled_per_rank"][0]
    assert kept > 50 * 70, kept  # the positives, not the quota
    planned = plan_rank(50_000, 1, 4096, 128, 0.001, discface=False).num_sample_planned
    assert abs(planned - kept) < 0.02 * kept, (planned, kept)


def test_traffic_hand_computed() -> None:
    # W=3, B=2, D=4, N=6, fp32; ring bytes: all-gather (W-1) n, all-reduce 2 (W-1)/W n, RS (W-1)/W n.
    p = plan_rank(10, 3, 2, 4, 0.5, "fp32", discface=True)
    expected = {
        "allgather_sizes": 2 * 8,
        "allgather_labels": 2 * 2 * 8,
        "allgather_embeddings": 2 * 2 * 4 * 4,
        "allreduce_max": 2 * 2 / 3 * 6 * 4,
        "allreduce_sum_exp_and_target": 2 * 2 / 3 * 12 * 4,
        "reduce_scatter_embedding_grad": 2 / 3 * 24 * 4,
        "allreduce_discface_sum": 2 * 2 / 3 * 4,
        "allreduce_b_grad": 2 * 2 / 3 * 4 * 4,
    }
    assert p.comm.keys() == expected.keys()
    for k, v in expected.items():
        assert math.isclose(p.comm[k], v), k
    assert math.isclose(p.comm_bytes_per_step, 16 + 32 + 64 + 32 + 64 + 64 + 16 / 3 + 64 / 3)
    off = plan_rank(10, 3, 2, 4, 0.5, "fp32", discface=False)
    assert math.isclose(p.comm_bytes_per_step - off.comm_bytes_per_step, 16 / 3 + 64 / 3)
    assert plan_rank(10, 1, 2, 4, 0.5).comm_bytes_per_step == 0


def test_traffic_does_not_grow_with_classes() -> None:
    small = plan_rank(10_000_000, 64, 128, 512, 0.1)
    big = plan_rank(100_000_000, 64, 128, 512, 0.1)
    assert small.comm == big.comm
    assert big.shard_weights_plus_momentum_bytes == 10 * small.shard_weights_plus_momentum_bytes


def test_table_across_worlds_and_bad_input() -> None:
    rows = plan_table(100_000_000, [512, 8, 64, 8], 128, 512, 0.1)
    assert [p.world_size for p in rows] == [8, 64, 512]
    # The shard shrinks with W, so weights + momentum per rank do too.
    wm = [p.shard_weights_plus_momentum_bytes for p in rows]
    assert wm == sorted(wm, reverse=True) and wm[0] == 2 * 12_500_000 * 512 * 4
    assert parse_worlds("8, 16,32") == [8, 16, 32]
    for bad in ("8,x", "0,8", ""):
        with pytest.raises(ValueError, match="--worlds"):
            parse_worlds(bad)
    with pytest.raises(ValueError, match="dtype"):
        plan_rank(10, 2, 2, 4, 0.5, "int8")


def test_cli_prints_table_and_writes_json(tmp_path) -> None:
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", "--classes", "10000000", "--world-size", "16", "--batch", "128",
                                   "--dim", "512", "--sample-rate", "0.1", "--worlds", "8,32",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "Across world sizes" in res.output and "TOTAL per rank" in res.output
    doc = json.loads(out.read_text())
    expect = plan_rank(10_000_000, 16, 128, 512, 0.1, device="cuda")  # the CLI plans for GPUs by default
    assert doc["plan"]["total_bytes"] == expect.total_bytes
    assert doc["plan"]["memory"] == expect.memory
    assert doc["plan"]["shard_rows"] == 625_000 and doc["plan"]["num_sample"] == 62_500
    assert [row["world_size"] for row in doc["table"]] == [8, 16, 32]

    bad = CliRunner().invoke(app, ["plan", "--classes", "10", "--world-size", "2", "--batch", "2",
                                   "--dtype", "fp8"])
    assert bad.exit_code != 0 and "dtype must be one of" in bad.output


def test_cli_shows_the_classes_the_plan_is_sized_for_and_says_why() -> None:
    res = CliRunner().invoke(app, ["plan", "--classes", "200000", "--world-size", "1", "--batch", "4096",
                                   "--dim", "256", "--sample-rate", "0.001", "--worlds", "1"], terminal_width=200)
    assert res.exit_code == 0, res.output
    planned = plan_rank(200_000, 1, 4096, 256, 0.001, device="cuda").num_sample_planned
    assert planned > 200 and f"{planned:,}" in res.output  # the table's "sampled" column: not the quota
    text = " ".join(res.output.split())
    assert (f"a step's positives in the largest shard (about {planned} for labels spread evenly over the "
            "classes) exceed the sampling quota 200") in text, text
    assert f"can keep up to 4096 classes there, more than the {planned} planned" in text, text
    quiet = CliRunner().invoke(app, ["plan", "--classes", "1000000", "--world-size", "2", "--batch", "128",
                                     "--dim", "512", "--sample-rate", "0.1"])
    assert quiet.exit_code == 0 and "note:" not in quiet.output, quiet.output


def test_cli_counts_the_head_optimizer_dtype_and_grad_accum(tmp_path) -> None:
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", "--classes", "1000000", "--world-size", "2", "--batch", "64",
                                   "--dtype", "bf16", "--optimizer", "adamw", "--grad-accum", "2",
                                   "--worlds", "4", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "optimizer=adamw" in res.output
    doc = json.loads(out.read_text())
    expect = plan_rank(1_000_000, 2, 64, 512, 1.0, "bf16", True, "adamw", 2, device="cuda")
    assert doc["plan"]["memory"] == expect.memory and doc["plan"]["optimizer"] == "adamw"
    assert doc["plan"]["shard_weights_plus_momentum_bytes"] == 500_000 * 512 * (2 + 8) + 500_000 * 8
    bad = CliRunner().invoke(app, ["plan", "--classes", "10", "--world-size", "2", "--batch", "2",
                                   "--optimizer", "lamb"])
    assert bad.exit_code != 0 and "optimizer must be one of" in bad.output
    cpu = CliRunner().invoke(app, ["plan", "--classes", "1000000", "--world-size", "2", "--batch", "64",
                                   "--device", "cpu", "--json", str(out)])
    assert cpu.exit_code == 0, cpu.output
    assert json.loads(out.read_text())["plan"]["memory"] == plan_rank(1_000_000, 2, 64, 512, 1.0).memory
    bad = CliRunner().invoke(app, ["plan", "--classes", "10", "--world-size", "2", "--batch", "2", "--device", "tpu"])
    assert bad.exit_code != 0 and "device must be 'cpu' or 'cuda'" in bad.output


def test_gpu_plan_counts_the_accelerator_chunks() -> None:
    """On a GPU the head's scratch goes by 64k-row chunks and 128 MiB dot blocks (partialfc.blocking),
    on the CPU by 512 rows and 1 MiB: the plan counts the device's."""
    cpu = plan_rank(10_000_000, 1, 512, 512, 0.1)
    gpu = plan_rank(10_000_000, 1, 512, 512, 0.1, device="cuda")
    assert cpu.memory["optimizer_chunks"] == 512 * 512 * 4
    assert gpu.memory["optimizer_chunks"] == 65536 * 512 * 4
    s = gpu.num_sample
    assert s == 1_000_000
    back = gpu.phases["backward"] - cpu.phases["backward"]
    assert back == (65536 - 512) * 512 * 4 + (65536 - 512) * 512 * 4  # chunks and the row-dot scratch
    assert gpu.device == "cuda" and gpu.to_dict()["device"] == "cuda"
