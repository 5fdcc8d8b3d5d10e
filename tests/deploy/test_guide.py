"""docs/deploy.md: every command block that runs on a CPU machine is run by a test, and the files it
names exist."""

from __future__ import annotations

import re

import pytest

from tests.deploy.guide import GUIDE, REPO, guide_block, guide_blocks


def test_every_cpu_block_is_marked_and_run_by_a_test():
    blocks = guide_blocks()
    assert len(blocks) >= 5, "the guide lost its runnable blocks"
    unmarked = [body for name, body in blocks if name is None]
    assert not unmarked, f"{GUIDE}: ```bash blocks must carry <!-- test: NAME -->: {unmarked}"
    names = [name for name, _ in blocks]
    assert len(names) == len(set(names)), f"duplicate markers in {GUIDE}: {names}"
    sources = "\n".join(p.read_text() for p in (REPO / "tests" / "deploy").glob("test_*.py"))
    run = set(re.findall(r"""guide_block\(["']([\w-]+)["']\)""", sources))
    run |= set(re.findall(r"""_run_block\(["']([\w-]+)["']""", sources))
    assert set(names) <= run, f"blocks no test runs: {sorted(set(names) - run)}"


def test_guide_block_parsing_joins_continuations_and_rejects_unknown_names():
    assert guide_block("k8s-validate")[0].startswith("kubernetes-validate ")
    with pytest.raises(LookupError, match="no-such-block"):
        guide_block("no-such-block")


def test_files_named_by_the_guide_exist():
    text = GUIDE.read_text()
    pattern = r"\b((?:docker|deploy/(?:k8s|slurm))/[\w./-]+\.(?:yaml|sbatch|cpu)|docker/Dockerfile)\b"
    paths = set(re.findall(pattern, text))
    assert {"docker/compose.yaml", "deploy/slurm/train.sbatch", "deploy/k8s/pytorchjob.yaml"} <= paths
    missing = [p for p in sorted(paths) if not (REPO / p).is_file()]
    assert not missing, f"{GUIDE} names files that do not exist: {missing}"
