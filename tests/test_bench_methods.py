# bench/bench_methods.py stays runnable as methods are added: every method built through train.py's
# wrap / make_optimizer / make_controller, stepped, its controller's events counted.
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_bench_methods_tiny(tmp_path):
    import bench_methods
    import train
    methods = [m for m in train.METHODS if m != "full"] + ["beamlora+dora"]
    res = bench_methods.main([f"--methods={','.join(methods)}", "--shapes=tiny", "--repeats=1", "--block=4",
                              "--warmup=4", "--memory=False", f"--out_json={tmp_path / 'b.json'}"])
    [row] = res["shapes"]
    assert list(row["step_s"]) == methods and row["over_ref"]["lora"] == 1.0
    assert all(t > 0 for t in row["step_s"].values())
    assert row["events_per_block"]["beamlora"] == row["events_per_block"]["beamlora+dora"] == 1  # dt = 4: one
    # prune/expand per block of 4 steps
    assert os.path.isfile(tmp_path / "b.json") and "| beamlora |" in res["markdown"]
