# configurator.py and the recipe files in config/: every recipe parses against train.py's defaults,
# carries the paper's Table 4 settings (BEAMLORA.md section 2), and its LoRA twin differs only in
# the method; --key=value overrides are type-checked.
import glob
import os

import pytest

import train
from configurator import ConfigError, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))
# the paper's recipes; config/smollm2_* fine-tunes a small real model on GSM8K instead (tests/test_gguf.py)
PAPER = [p for p in CONFIGS if not os.path.basename(p).startswith("smollm2_")]

# (model, dataset) -> (r, p_init, dt), BEAMLORA.md section 2 / paper Table 4
TABLE4 = {("llama2_7b", "metamath"): (64, 0.95, 3000), ("mistral_7b", "metamath"): (64, 0.95, 2500),
          ("llama2_7b", "codefeedback"): (64, 0.95, 1200), ("mistral_7b", "codefeedback"): (64, 0.95, 800),
          ("llama2_7b", "commonsense"): (32, 0.96, 3200), ("llama2_13b", "commonsense"): (32, 0.96, 2400)}


def test_every_recipe_has_a_twin_and_a_row():
    names = {os.path.basename(p)[:-3] for p in PAPER}
    expected = {f"{m}_{d}_{method}" for (m, d) in TABLE4 for method in ("beamlora", "lora")}
    assert names == expected


@pytest.mark.parametrize("path", PAPER, ids=lambda p: os.path.basename(p))
def test_recipe_matches_table4(path, tmp_path):
    cfg = parse_args([path], train.DEFAULTS)
    name = os.path.basename(path)[:-3]
    model, _, rest = name.partition("b_")
    dataset, method = rest.split("_")
    r, p_init, dt = TABLE4[(model + "b", dataset)]
    assert (cfg["method"], cfg["r"], cfg["alpha"], cfg["p_init"], cfg["dt"]) == (method, r, 2.0 * r, p_init, dt)
    assert (cfg["batch_size"], cfg["epochs"], cfg["dtype"]) == (32, 3, "bfloat16")
    targets = {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"} | \
        (set() if dataset == "commonsense" else {"o_proj", "gate_proj"})
    assert set(cfg["targets"].split(",")) == targets
    assert cfg["tau"] == (0.03 if cfg["lr"] < 1e-4 else 0.05)  # the authors' rule
    assert cfg["out_dir"].endswith(name)
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "response": "r"}\n')
    train.check_config(dict(cfg, data=str(data)))  # the choices and ranges train.py enforces


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.endswith("_lora.py")], ids=os.path.basename)
def test_lora_twin_differs_only_in_method(path):
    lora = parse_args([path], train.DEFAULTS)
    beam = parse_args([path.replace("_lora.py", "_beamlora.py")], train.DEFAULTS)
    diff = {k for k in beam if beam[k] != lora[k]}
    assert diff == {"method", "out_dir"}


def test_overrides_after_a_config_file():
    path = os.path.join(ROOT, "config", "llama2_7b_metamath_beamlora.py")
    cfg = parse_args([path, "--r=16", "--alpha=32", "--out_dir=123", "--no_expand", "--lr=1e-4"], train.DEFAULTS)
    assert cfg["r"] == 16 and cfg["alpha"] == 32.0 and isinstance(cfg["alpha"], float)
    assert cfg["out_dir"] == "123" and cfg["no_expand"] is True and cfg["lr"] == 1e-4
    assert cfg["p_init"] == 0.95  # still the file's


@pytest.mark.parametrize("argv, message", [
    (["--rank=8"], "unknown option --rank; valid options: "),
    (["--r=8.5"], "--r: expected int, got 8.5"),
    (["--r=True"], "--r: expected int"),
    (["--no_expand=3"], "--no_expand: expected bool"),
    (["--lr"], "--lr needs a value"),
    (["config/nope.py"], "config/nope.py: config file not found"),
])
def test_bad_options(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(argv, train.DEFAULTS)
    assert message in str(e.value)


def test_unknown_key_in_a_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("r = 8\nrank = 8\n")
    with pytest.raises(ConfigError) as e:
        parse_args([str(path)], train.DEFAULTS)
    assert f"{path}: unknown key 'rank'; valid keys: " in str(e.value) and "p_init" in str(e.value)
