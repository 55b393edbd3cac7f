"""FSDP turns every parameter into a 1-D shard: weight decay must still go to the same matrices as unsharded, and
the throughput meter must still count whole matrices."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_fsdp_keeps_the_weight_decay_groups_and_the_flop_count(tiny_model_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "fsdp_shapes_worker.py"), str(tiny_model_dir), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=HERE, check=False)
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert done.returncode == 0 and len(reports) == 2, done.stderr[-3000:]
    for report in reports:
        assert report["before"] and any("mlp" in name for name in report["before"])
        assert report["after"] == report["before"]
        assert report["matmul_after"] == report["matmul_before"] > 0
