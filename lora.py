"""
Plain LoRA (Hu et al., 2021), and the shape of every method. A method is a module: train.py finds it by its
--method name (train.METHODS) and calls the same hooks for all of them. A method module defines what it does
differently from plain LoRA; a hook it leaves out is taken from here (train.method_hooks).

    settings        lowercase module-level defaults with a comment each, under a heading comment: --help lists
                    them under the method and the configurator checks their types (beamlora.py has an example)
    check(cfg)      its settings and how they combine with the shared ones: one line naming the first bad one
    rank(cfg)       the ranks each module's tensors hold (--r; more where a method allocates ranks itself)
    wrap(model, cfg) -> {name: LoRALinear}           the one LoRA layer (beamlora.py), its seams filled in
    controller(mods, optimizer, cfg, total)         -> what happens between optimizer steps (beamlora.Controller)
    export(model, controller, cfg, tokenizer_path)  writes the result into out_dir
    TRAINS_BASE     the base's own weights train (full fine-tuning: the base in fp32, no adapter)
    SHIPS           what the result is: adapter/ on the base, merged/ (ReLoRA) or model/ (full)
    DORA            --dora combines with it (a LoRA-family layer that PEFT also has with DoRA)
The layer (LoRALinear and its seams) and the Controller are in beamlora.py; a method's settings must not share a
name with another's, and module-level constants that are not settings are named in CAPITALS.
"""
import os
import shutil

import peft_io
from beamlora import Controller, lora_layers

TRAINS_BASE = False
SHIPS = "adapter"
DORA = True


def check(cfg):
    pass


def rank(cfg):
    return cfg["r"]


def wrap(model, cfg):
    return lora_layers(model, cfg, cfg["r"])


def controller(mods, optimizer, cfg, total):
    return Controller(mods, optimizer)  # nothing between steps


def save_model(model, tokenizer_path, out_dir, merge=False):
    """An HF checkpoint of the model (the adapters merged first, if asked) with its tokenizer: what eval.py and
    sample.py load with --model."""
    if merge:
        peft_io.merge_lora(model)
    model.save_pretrained(out_dir)
    shutil.copy(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))


def export(model, controller, cfg, tokenizer_path):
    """adapter/ for the base the run started from (PEFT format, every gate folded into A); merged/ with
    --save_merged."""
    out = cfg["out_dir"]
    peft_io.export_peft(model, os.path.join(out, "adapter"), cfg["init_from"], cfg["export_rank"])
    if cfg["save_merged"]:
        save_model(model, tokenizer_path, os.path.join(out, "merged"), merge=True)
