"""A process that leaves with a DataLoader still open must exit (workers ignore SIGTERM for the stop signals).

multiprocessing's exit handler stops daemonic children with SIGTERM and joins them; the workers ignore
SIGTERM (a scheduler's stop signal reaches every process of a job), so without the loader's own exit
handler a rank that failed mid-epoch (its iterator kept alive by the exception) waited forever - seen as a
test run that printed its summary and never ended.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
def test_process_with_an_open_loader_exits(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from data_pipeline.dataset import build_dataloader
        from data_pipeline.synth import generate
        prefix = {str(tmp_path / "train")!r}
        generate(prefix, 6, 4, image_size=16, val_identities=0, seed=2, workers=1)
        loader = build_dataloader(prefix, 4, workers=2, seed=0)
        loader.set_epoch(0)
        it = iter(loader)
        next(it)
        KEEP = it  # open at exit, as after an exception in the training loop
        print("leaving", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaving" in proc.stdout
    assert "killed by signal" not in proc.stderr, proc.stderr[-2000:]
