# bench/same_numbers.py's comparison on hand-made run directories (nothing is trained): identical runs pass,
# and a changed tensor byte, checkpoint entry or records line is reported with its path.
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import same_numbers  # noqa: E402


def write_safetensors(path, tensors, metadata):
    """The format by hand: an 8-byte header length, the JSON header, then the tensors' bytes."""
    header, data = {"__metadata__": metadata}, b""
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def make_run(top, config=None):
    """A run directory as bench/same_numbers.py leaves one: stdout.txt, and out/ with what train.py writes."""
    torch.manual_seed(0)
    out = top / "out"
    (out / "adapter").mkdir(parents=True)
    A, B = torch.randn(4, 8), torch.randn(8, 4)
    write_safetensors(out / "adapter" / "adapter_model.safetensors",
                      {"base_model.model.layers.0.q_proj.lora_A.weight": A,
                       "base_model.model.layers.0.q_proj.lora_B.weight": B}, {"format": "pt"})
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8.0}))
    config = config or {"method": "beamlora", "r": 4, "lr": 0.01}
    torch.save({"params": {"q.lora_A": A, "q.lora_B": B},
                "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": A * 0.1}},
                              "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
                "step": 3, "config": json.dumps(config), "log_losses": [1.5, 1.25],
                "rng_cpu": torch.get_rng_state()}, out / "ckpt.pt")
    (out / "events.jsonl").write_text("".join(json.dumps({"step": s, "kind": "prune_expand", "p": 0.9 + s / 100}) + "\n"
                                              for s in (1, 2, 3)))
    (out / "log.jsonl").write_text(json.dumps({"step": 3, "loss": 2.5, "lr": 0.01, "tok_s": 123.4, "mfu": None,
                                               "mem_gib": 0.3}) + "\n")
    (top / "stdout.txt").write_text("step 3/3 | loss 2.5000 | 1,234 tok/s\nheld-out loss 2.4000\n")
    return top


@pytest.fixture
def runs(tmp_path):
    return make_run(tmp_path / "a"), make_run(tmp_path / "b")


def test_identical(runs):
    files, tensors, diff = same_numbers.compare_dirs(*runs)
    # ckpt.pt: params A, B, the step and exp_avg, rng_cpu; the adapter: A and B
    assert (files, tensors, diff) == (6, 7, None)


def test_wall_clock_and_key_order_ignored(runs, tmp_path):
    a, b = runs
    row = {"mem_gib": 9.9, "mfu": 0.5, "tok_s": 1.0, "lr": 0.01, "loss": 2.5, "step": 3}  # other order and timings
    (b / "out" / "log.jsonl").write_text(json.dumps(row) + "\n")
    (b / "stdout.txt").write_text("step 3/3 | loss 2.5000 | 99 tok/s\nheld-out loss 2.4000\n")
    c = make_run(tmp_path / "c", config={"lr": 0.01, "r": 4, "method": "beamlora"})  # config JSON, keys reordered
    assert same_numbers.compare_dirs(a, b)[2] is None
    assert same_numbers.compare_dirs(a, c)[2] is None


def flip_byte(path, offset_from_end):
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 1
    path.write_bytes(bytes(raw))


def test_tensor_byte_changed(runs):
    a, b = runs
    flip_byte(b / "out" / "adapter" / "adapter_model.safetensors", 3)  # in the last tensor (B)
    diff = same_numbers.compare_dirs(a, b)[2]
    assert diff.startswith("out/adapter/adapter_model.safetensors:base_model.model.layers.0.q_proj.lora_B.weight: "
                           "values differ (1 of 32 elements, first at flat index 31: "), diff


def test_checkpoint_entry_changed(runs):
    a, b = runs
    ck = torch.load(b / "out" / "ckpt.pt", weights_only=True)
    ck["optimizer"]["state"][0]["exp_avg"][2, 5] = ck["optimizer"]["state"][0]["exp_avg"][2, 5].nextafter(
        torch.tensor(1e9))  # one ulp
    torch.save(ck, b / "out" / "ckpt.pt")
    diff = same_numbers.compare_dirs(a, b)[2]
    assert diff.startswith("out/ckpt.pt:optimizer.state.0.exp_avg: values differ (1 of 32 elements, first at flat "
                           "index 21"), diff
    ck = torch.load(a / "out" / "ckpt.pt", weights_only=True)
    ck["log_losses"][1] = 1.2500000000000002  # a plain value inside the checkpoint
    torch.save(ck, b / "out" / "ckpt.pt")
    assert same_numbers.compare_dirs(a, b)[2] == "out/ckpt.pt:log_losses[1]: 1.25 vs 1.2500000000000002"


def test_config_value_changed(tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", config={"method": "beamlora", "r": 4, "lr": 0.02})
    assert same_numbers.compare_dirs(a, b)[2] == "out/ckpt.pt:config.lr: 0.01 vs 0.02"


def test_negative_zero_is_not_zero():
    with pytest.raises(same_numbers.Differ, match="x: values differ"):
        same_numbers.compare_values(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]), "x")
    with pytest.raises(same_numbers.Differ):
        same_numbers.compare_values({"a": [0.0]}, {"a": [-0.0]}, "y")


def test_events_line_changed(runs):
    a, b = runs
    lines = (b / "out" / "events.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"p": 0.92', '"p": 0.93')
    (b / "out" / "events.jsonl").write_text("".join(lines))
    diff = same_numbers.compare_dirs(a, b)[2]
    assert diff == "out/events.jsonl line 2 (step 2): " + repr(lines[1].strip().replace("0.93", "0.92")) + " vs " + \
        repr(lines[1].strip()), diff


def test_log_loss_held_out_loss_and_files(runs):
    a, b = runs
    (b / "out" / "log.jsonl").write_text(json.dumps({"step": 3, "loss": 2.5000001, "lr": 0.01, "tok_s": 123.4,
                                                     "mfu": None, "mem_gib": 0.3}) + "\n")
    assert same_numbers.compare_dirs(a, b)[2] == "out/log.jsonl line 1 (step 3): loss: 2.5 vs 2.5000001"
    shutil.copy(a / "out" / "log.jsonl", b / "out" / "log.jsonl")
    (b / "stdout.txt").write_text("held-out loss 2.4001\n")
    assert same_numbers.compare_dirs(a, b)[2] == "stdout.txt: held-out losses ['2.4000'] vs ['2.4001']"
    shutil.copy(a / "stdout.txt", b / "stdout.txt")
    (b / "out" / "ranks.json").write_text("{}")
    assert same_numbers.compare_dirs(a, b)[2] == "files differ: out/ranks.json (second only)"


def test_bad_options_one_line():
    script = os.path.join(ROOT, "bench", "same_numbers.py")
    for argv, msg in ((["--bogus=1"], "unknown option --bogus"), ([], "--against: give the commit"),
                      (["--against=HEAD", "--methods=lora,nope"], "--methods: unknown case(s) nope"),
                      (["--against=no-such-commit-xyz"], "git rev-parse")):
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: {msg}"), (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
