# bench/gpu_check.py stays runnable without a GPU: at tiny sizes on the CPU every section's code path runs and
# lands in the one JSON (the CUDA tests collected and skipped); a section out of time is recorded as a timeout,
# and a pytest killed mid-run still reports the tests it finished.
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytest.importorskip("transformers")
pytest.importorskip("peft")
sys.path.insert(0, os.path.join(ROOT, "bench"))


def gpu_check(out, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--tiny", "--device=cpu",
                           f"--out_dir={out}", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        return json.load(f)


def test_gpu_check_tiny_on_cpu(tmp_path):
    rep = gpu_check(tmp_path, "--budget=900")
    assert {k: s["status"] for k, s in rep["sections"].items()} == dict.fromkeys(
        ["env", "loss", "train", "tests", "decode"], "ok"), {k: s.get("log_tail") for k, s in rep["sections"].items()}
    assert rep["env"]["torch"] == torch.__version__ and rep["env"]["device"] == "cpu"
    tests = rep["tests"]
    assert len(tests) >= 10 and all(name.startswith("test_cuda.py::") for name in tests)
    assert all(r["outcome"] == "skipped" for r in tests.values())  # no CUDA here
    train = rep["train"]["gpu_recipe"]
    assert {"ours LoRA", "HF+PEFT LoRA", "ours BeamLoRA"} <= set(train["results"]) and not train["errors"]
    assert all(r["attn_flops_per_token"] > 0 and r["tok_s"] > 0 for r in train["results"].values())
    loss = rep["loss"]["results"]
    assert abs(loss["lm_loss"]["loss"] - loss["full logits"]["loss"]) <= 1e-3 * abs(loss["full logits"]["loss"])
    sides = rep["decode"]["sides"]
    assert set(sides) == {"transformers", "ours cache", "ours static", "ours compiled"}
    assert all(x["rows_identical_to_transformers"] == 1.0 for x in rep["decode"]["check"].values())
    assert rep["aims"]["decode tokens identical to transformers' (fp32 check, all sides)"]["holds"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert f"## CUDA tests: {len(tests)} skipped" in md and "## Aims" in md


def test_a_section_out_of_time_is_recorded(tmp_path):
    rep = gpu_check(tmp_path, "--sections=train", "--budget=2")  # 5 s at least: bench_train needs more
    s = rep["sections"]["train"]
    assert s["status"] == "timeout" and s["limit"] == 5.0 and s["s"] < 60 and "log_tail" in s
    assert os.path.isfile(tmp_path / "gpu_check.md")


def test_tests_of_a_killed_pytest_are_kept(tmp_path):
    import gpu_check as gc
    (tmp_path / "tests.log").write_text(
        "tests/test_cuda.py::test_a PASSED\ntests/test_cuda.py::test_b[bfloat16] FAILED\n"
        "tests/test_cuda.py::test_c SKIPPED (needs CUDA)\ntests/test_cuda.py::test_d \n")
    assert gc.test_results(str(tmp_path)) == {
        "test_cuda.py::test_a": {"outcome": "passed"}, "test_cuda.py::test_b[bfloat16]": {"outcome": "failed"},
        "test_cuda.py::test_c": {"outcome": "skipped"}, "test_cuda.py::test_d": {"outcome": "timeout"}}


def test_bad_option(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--sections=train,nope",
                           f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 1 and proc.stderr.startswith("error: --sections=train,nope")
            and "Traceback" not in proc.stderr)
