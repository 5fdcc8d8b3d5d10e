"""The in-step random draws (dropout, drop_path, token masking) are one stream per rank: real gloo ranks
build the training components and draw their dropout masks; a resume on another world size reseeds them
for the step reached."""

from __future__ import annotations

import torch

from launcher.trainer.checkpoint_files import CheckpointContents
from launcher.trainer.checkpointer import RandomState
from launcher.trainer.rank_rng import rank_stream_seed
from tests.support.distributed import run_ranks


def _build_and_draw(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    from launcher.config import load_config
    from launcher.distributed import DistContext
    from launcher.trainer.components import build

    cfg = load_config(None, ["model.backbone=tiny", "model.image_size=32", "model.embedding_size=16",
                             "model.dropout=0.5", "train.seed=11", "train.batch_size=4"])
    ctx = DistContext(rank, world_size, rank, world_size, 0, torch.device("cpu"), "gloo")
    c = build(cfg, ctx, num_classes=10)
    module = c.engine.module
    weights = torch.cat([p.detach().flatten() for p in module.parameters()])
    # the same image through the same weights: only dropout's mask can make two ranks' embeddings differ
    image = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32).repeat(4, 1, 1, 1)
    module.train()
    with torch.no_grad():
        return {"weights": weights, "embeddings": module(image), "state": torch.get_rng_state()}


def test_ranks_share_the_initial_weights_but_draw_their_own_dropout_masks_reproducibly():
    first, again = run_ranks(_build_and_draw, 2), run_ranks(_build_and_draw, 2)
    assert torch.equal(first[0]["weights"], first[1]["weights"]), "the backbone's init must be the same everywhere"
    assert not torch.equal(first[0]["embeddings"], first[1]["embeddings"]), \
        "rank 1 drew rank 0's dropout masks: one stream on every rank"
    for rank in range(2):  # the same seed gives each rank the same draws again
        assert torch.equal(first[rank]["embeddings"], again[rank]["embeddings"]), rank


def test_a_resume_on_another_world_size_reseeds_each_rank_for_the_step_reached():
    saved = CheckpointContents(step=6, rank_state=None)  # what a save from another world size gives a rank
    torch.manual_seed(rank_stream_seed(11, 1, 0))  # the stream this rank was built with
    replay = torch.rand(8)
    torch.manual_seed(rank_stream_seed(11, 1, 0))
    RandomState(torch.device("cpu"), seed=11, rank=1).load(saved)
    drawn = torch.rand(8)
    assert not torch.equal(drawn, replay), "the resumed rank replays the draws of step 1"
    torch.manual_seed(rank_stream_seed(11, 1, 6))
    assert torch.equal(drawn, torch.rand(8))
    assert rank_stream_seed(11, 0, 6) != rank_stream_seed(11, 1, 6) != rank_stream_seed(12, 1, 6)
