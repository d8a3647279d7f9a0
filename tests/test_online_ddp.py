"""The online mode under two data-parallel processes (torchrun, gloo, CPU): the rule runs on the step's global batch
and the update equals one process training on the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "workers" / "online_ddp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, model: Path, data: Path, nproc: int, update: str, batch: int, accumulation: int) -> dict:
    worker = [str(WORKER), "--model", str(model), "--data", str(data), "--out", str(out), "--update", update]
    worker += ["--batch", str(batch), "--accumulation", str(accumulation)]
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADSIFT_DEBUG": "1"}
    done = subprocess.run([*launch, *worker], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "info": json.loads((out / "info.json").read_text()),
        "weights": load_file(str(out / "lora.safetensors")),
        "log": [json.loads(line) for line in (out / "online.jsonl").read_text().splitlines()],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "update, reference, accumulation",
    [("auto", "reuse", 1), ("recompute", "recompute", 2)],
)
def test_two_ranks_select_from_the_global_batch_and_train_as_one_process(
    tmp_path, tiny_model_dir, mixed_records, update, reference, accumulation
):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in mixed_records))  # 24 rows: 3 steps of 8
    per_rank = 4 // accumulation
    ranks = train(tmp_path / "ranks", tiny_model_dir, data, 2, update, per_rank, accumulation)
    alone = train(tmp_path / "alone", tiny_model_dir, data, 1, reference, 2 * per_rank, accumulation)
    assert ranks["info"]["world_size"] == 2 and alone["info"]["world_size"] == 1
    assert ranks["info"]["reuse"] == (reference == "reuse")  # `auto` reuses under plain DDP
    assert ranks["info"]["steps"] == alone["info"]["steps"] == 3
    # Each step's window is the global batch of 8 rows (both ranks' rows), and the rule kept the same half of it.
    assert [entry["rows"] for entry in ranks["log"]] == [8, 8, 8]
    for mine, reference_step in zip(ranks["log"], alone["log"]):
        assert mine["kept"] == 4
        assert sorted(mine["kept_ids"]) == sorted(reference_step["kept_ids"])
    assert ranks["weights"].keys() == alone["weights"].keys()
    for name, weight in ranks["weights"].items():
        torch.testing.assert_close(weight, alone["weights"][name], rtol=0, atol=1e-6, msg=name)
