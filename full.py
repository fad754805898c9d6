"""
Full fine-tuning: every weight of the base trains (in fp32), nothing happens between steps, and the result is the
whole model (out_dir/model/, an HF checkpoint). Also how demo.py pretrains its tiny base from scratch.
"""
import os

import lora

TRAINS_BASE = True
SHIPS = "model"
DORA = False  # no adapter to decompose


def wrap(model, cfg):
    return {}  # no adapter: the base's own weights train


def export(model, controller, cfg, tokenizer_path):
    lora.save_model(model, tokenizer_path, os.path.join(cfg["out_dir"], "model"))
