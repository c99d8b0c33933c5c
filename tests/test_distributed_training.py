"""DistributedDataParallel for real: two CPU processes (gloo) under torchrun train what one process trains,
up to float rounding, and only rank 0 writes the model."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from recops.serving.triton_server import free_port
from recops.training.distributed import World, world_from_env

SPEC = {
    "apiVersion": "recops.dev/v1alpha1", "kind": "RecModel", "metadata": {"name": "ddp"},
    "spec": {
        "data": {"source": "synthetic", "synthetic": {"users": 150, "items": 80, "days": 10, "seed": 4}},
        "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
        "lora": {"r": 4, "alpha": 8},
        # Backbone text re-encoded every step too: its random picks are made for the whole batch.
        "training": {"epochs": 2, "batchSize": 128, "embeddingDim": 32, "textItemsPerStep": 8},
    },
}
RECOPS = str(Path(sys.executable).parent / "recops")


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["sequence", "pooled"])
def test_two_processes_train_what_one_process_trains(tmp_path, tower):
    spec = copy.deepcopy(SPEC)
    # No dropout in the sequence tower: each process draws its own masks for its own shard's shape.
    spec["spec"]["training"].update({"userTower": tower, "sequenceDropout": 0.0} if tower == "sequence"
                                    else {"userTower": tower})
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(spec))
    train = ["train", "-f", "ddp.yaml", "--baselines", ""]
    run([RECOPS, *train, "--out", "one"], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), RECOPS, *train, "--out", "two"], tmp_path)

    one, two = tmp_path / "one", tmp_path / "two"
    np.testing.assert_allclose(np.load(two / "item_index.npy"), np.load(one / "item_index.npy"), atol=2e-3)
    recall = [json.loads((d / "metrics.json").read_text())["metrics"]["twotower"]["recall@20"] for d in (one, two)]
    assert recall[1] == pytest.approx(recall[0], abs=0.02)
    processes = [json.loads((d / "metrics.json").read_text())["processes"] for d in (one, two)]
    assert processes == [1, 2]  # each of the two trained on half of every batch, and DDP averaged them


def test_the_world_comes_from_torchrun_s_environment():
    assert world_from_env({}) == World(0, 1, 0)
    world = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert world == World(3, 4, 1) and not world.is_main
    assert world.shard(np.arange(10)).tolist() == [3, 7]
    with pytest.raises(ValueError, match="RANK=4 is not within WORLD_SIZE=4"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must be integers"):
        world_from_env({"RANK": "zero"})


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    """As in a cluster (c10d rendezvous, restarts allowed): a worker SIGKILLed mid-training makes torchrun
    restart both; they resume from the checkpoint and end where an undisturbed run ends."""
    import psutil

    spec = yaml.safe_load(yaml.safe_dump(SPEC))
    spec["spec"]["training"].update(epochs=3, checkpointEverySteps=1)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(spec))

    def torchrun(out: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv-id", out, RECOPS, "train", "-f", "ddp.yaml", "--baselines", "", "--out", out]

    run(torchrun("calm"), tmp_path)
    agent = subprocess.Popen(torchrun("killed"), cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        checkpoint = tmp_path / "killed" / "checkpoint.pt"
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "train" in p.cmdline()]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].kill()
        output, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            for child in psutil.Process(agent.pid).children(recursive=True):
                child.kill()
            agent.kill()
    assert agent.returncode == 0, output[-3000:]
    assert "exitcode: -9" in output  # the agent saw the kill, and restarted the workers
    np.testing.assert_allclose(np.load(tmp_path / "killed" / "item_index.npy"),
                               np.load(tmp_path / "calm" / "item_index.npy"), atol=1e-5)
