# AdaLoRA against PEFT's AdaLoRA on the same tiny checkpoint (transformers' LlamaForCausalLM): the same initial
# adapter, batches, learning rates and budget schedule give the same masks at every step and the same adapter
# after 20 steps; the export loads in PEFT as a plain LoRA with the AdaLoRA model's logits; resume; DDP.
import json
import os

import pytest
import torch

import adalora
import peft_io
import dataset
import train
from model import Transformer
from test_train import cfg_for, run_ddp  # base, demo_data: fixtures in conftest.py
from tokenizer import Tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ada_cfg(base, demo_data, out, **kw):
    # init_r 5 -> r 3 over 14 modules; budget falls over steps 4..14 (masking every 2), final mask at 15
    cfg = dict(method="adalora", r=3, init_r=5, tinit=3, tfinal=5, deltaT=2, max_steps=20, batch_size=8,
               micro_batch_size=8, lr=1e-2, log_interval=1, orth_reg_weight=0.1)
    cfg.update(kw)
    return cfg_for(base, demo_data, out, **cfg)


def test_budget_schedule_hand_checked():
    # init 10, target 4, tinit 2, tfinal 3, total 11: the budget falls over steps 3..8 as (1 - (t-2)/6)^3
    got = [adalora.budget(t, 10, 4, 2, 3, 11, 2) for t in range(1, 12)]
    want = [(10, False), (10, False), (int(6 * (5 / 6) ** 3 + 4), False), (int(6 * (4 / 6) ** 3 + 4), True),
            (int(6 * (3 / 6) ** 3 + 4), False), (int(6 * (2 / 6) ** 3 + 4), True), (int(6 * (1 / 6) ** 3 + 4), False),
            (4, True), (4, True), (4, True), (4, True)]
    assert got == want and [b for b, _ in want] == [10, 10, 7, 5, 4, 4, 4, 4, 4, 4, 4]


def test_orth_penalty_hand_checked():
    A = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # A A^T - I = diag(0, 3): ||.||_F = 3
    B = torch.zeros(3, 2)  # B^T B - I = -I: ||.||_F = sqrt(2)
    assert abs(adalora.orth_penalty([(A, B)], "code").item() - (3 + 2 ** 0.5) / 2) < 1e-6  # mean of the norms
    assert abs(adalora.orth_penalty([(A, B), (A, B)], "paper").item() - 2 * (9 + 2)) < 1e-5  # sum of the squares


def test_matches_peft_adalora(base, demo_data, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    # lr 1e-3: the two models' fp32 rounding (logits of size ~20 here), amplified by Adam, stays ~1e-5 after 20 steps
    cfg = ada_cfg(base, demo_data, tmp_path / "ours", lr=1e-3)
    res = train.train(cfg)
    total, final = cfg["max_steps"], cfg["max_steps"] - cfg["tfinal"]

    # the initial adapter train.train built: same seed, same construction
    torch.manual_seed(cfg["seed"])
    init = train.wrap(Transformer.from_pretrained(base), cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    pcfg = peft.AdaLoraConfig(init_r=5, target_r=3, lora_alpha=cfg["alpha"], lora_dropout=0.0, tinit=3, tfinal=5,
                              deltaT=2, total_step=total, beta1=0.85, beta2=0.85, orth_reg_weight=0.1,
                              target_modules=TARGETS, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pcfg)
    layers = {n: pm.base_model.model.get_submodule(n) for n in init}
    assert len(layers) == 14
    with torch.no_grad():
        for n, m in init.items():
            layers[n].lora_A["default"].copy_(m.lora_A)
            layers[n].lora_B["default"].copy_(m.lora_B)
            layers[n].lora_E["default"].copy_(m.gate.lora_E[:, None])
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), weight_decay=0.0)
    ex = dataset.tokenize_file(cfg["data"], Tokenizer(base), cfg)
    lengths = [len(e[0]) for e in ex]
    per_epoch = len(dataset.epoch_batches(lengths, 0, cfg["seed"], cfg["batch_size"]))
    peft_masks, peft_losses = {}, []
    for step in range(total):
        batch = dataset.epoch_batches(lengths, step // per_epoch, cfg["seed"], cfg["batch_size"])[step % per_epoch]
        x, _ = dataset.collate(ex, batch, "cpu")
        labels = torch.full_like(x, -100)  # transformers shifts the labels itself
        for row, j in enumerate(batch):
            labels[row, :len(ex[j][1])] = torch.tensor(ex[j][1])
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, total, cfg)
        out = pm(input_ids=x, labels=labels)  # loss = mean CE + orth_reg_weight * R(P, Q)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        pm.base_model.update_and_allocate(step + 1)  # our controller.step(t): t optimizer steps done
        if adalora.budget(step + 1, 70, 42, 3, 5, total, 2)[1] and step + 1 < final or step + 1 == final:
            peft_masks[step + 1] = {n: (layers[n].lora_E["default"].flatten() == 0).nonzero().flatten().tolist()
                                    for n in init}
        opt.zero_grad()
        with torch.no_grad():
            peft_losses.append(out.loss.item())

    # the masks of every step, ours from events.jsonl
    events = [json.loads(line) for line in open(tmp_path / "ours" / "events.jsonl")]
    assert [e["step"] for e in events] == [4, 6, 8, 10, 12, 14, 15] == sorted(peft_masks)
    assert events[-1]["kind"] == "final_mask" and events[-1]["budget"] == 42
    for e in events:
        assert e["masked"] == peft_masks[e["step"]], e["step"]
    assert sum(map(len, events[-1]["masked"].values())) == 70 - 42
    assert len({len(v) for v in events[-1]["masked"].values()}) > 1  # the ranks differ across modules
    # the adapter after 20 steps (checkpoint: lora_A, lora_B, gate.lora_E)
    ck = torch.load(tmp_path / "ours" / "ckpt.pt", weights_only=True)["params"]
    for n, layer in layers.items():
        for ours, theirs in ((ck[f"{n}.lora_A"], layer.lora_A["default"]), (ck[f"{n}.lora_B"], layer.lora_B["default"]),
                             (ck[f"{n}.gate.lora_E"], layer.lora_E["default"].flatten())):
            # 20 Adam steps of lr 1e-3 move a weight by up to 2e-2; the two sides' fp32 rounding, which Adam's
            # normalisation amplifies where a gradient is near 0, stays ~1e-5 (it depends on the data and the thread
            # count); an error in a step (a wrong mask, scale or gradient) moves a weight by ~lr = 1e-3
            assert (ours - theirs.detach()).abs().max() <= 5e-5, n
    assert (ck[f"{n}.gate.lora_E"] == 0).sum() == len(events[-1]["masked"][n])  # pruned lambdas are exact zeros
    # the first loss: ours logs the CE; PEFT's adds orth_reg_weight * R(P, Q), ours adds the same as penalty()
    with torch.no_grad():
        penalty = 0.1 * adalora.orth_penalty([(m.lora_A, m.lora_B) for m in init.values()], "code").item()
    assert penalty > 0.1 and abs(res["losses"][0] + penalty - peft_losses[0]) < 1e-5 * peft_losses[0]

    # the export: a plain LoRA (pruned ranks dropped, rank_pattern) that PEFT loads with the AdaLoRA model's logits
    x = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pm.eval()(input_ids=x).logits
    conf = json.load(open(tmp_path / "ours" / "adapter" / "adapter_config.json"))
    kept = {n: max(1, 5 - len(v)) for n, v in events[-1]["masked"].items()}  # a module that kept none: a zero rank
    assert conf["r"] == max(kept.values()) and conf["rank_pattern"] == {n: k for n, k in kept.items() if k != conf["r"]}
    model = Transformer.from_pretrained(base)
    mods = train.wrap(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(ck[n])
    peft_io.export_peft(model, str(tmp_path / "padded"), base, uniform_rank=5)
    for adapter in ("ours/adapter", "padded"):
        lora = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                              str(tmp_path / adapter))
        with torch.no_grad():
            got = lora.eval()(input_ids=x).logits
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), adapter
    assert json.load(open(tmp_path / "padded" / "adapter_config.json"))["r"] == 5 and mods


def test_resume_equals_uninterrupted(base, demo_data, tmp_path):
    # stopped inside the falling budget (after 5, between maskings), resumed, stopped in the final phase (after 12)
    kw = dict(max_steps=14, tinit=2, tfinal=4, dropout=0.1, micro_batch_size=4)
    full = train.train(ada_cfg(base, demo_data, tmp_path / "full", **kw))
    part = train.train(ada_cfg(base, demo_data, tmp_path / "part", stop_after=5, **kw))
    mid = train.train(ada_cfg(base, demo_data, tmp_path / "part", resume=True, stop_after=7, **kw))
    rest = train.train(ada_cfg(base, demo_data, tmp_path / "part", resume=True, **kw))
    got = part["losses"] + mid["losses"] + rest["losses"]
    assert len(got) == 14 and max(abs(a - b) for a, b in zip(got, full["losses"])) <= 1e-6
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["params"] for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ev = lambda d: open(tmp_path / d / "events.jsonl").read()  # noqa: E731
    assert ev("full") == ev("part") and ev("full").count("\n") == 4  # masks at 4, 6, 8; the final one at 10


def test_ddp_two_processes_match_one(base, demo_data, tmp_path):
    kw = dict(max_steps=8, tinit=1, tfinal=2, micro_batch_size=2)
    single = train.train(ada_cfg(base, demo_data, tmp_path / "one", **kw))
    run_ddp(ada_cfg(base, demo_data, tmp_path / "two", **kw), tmp_path)
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert max(abs(r["loss"] - s) for r, s in zip(log, single["losses"])) < 1e-5
    ev = [[json.loads(line) for line in open(tmp_path / d / "events.jsonl")] for d in ("one", "two")]
    assert [e["masked"] for e in ev[0]] == [e["masked"] for e in ev[1]] and len(ev[0]) == 3  # 2, 4; final 6
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["params"] for d in ("one", "two"))
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


@pytest.mark.parametrize("change, message", [
    (dict(tinit=16), "tinit=16, tfinal=5 leave no steps"),
    (dict(init_r=2), "--init_r=2: must be at least --r=3"),  # adalora.check, before anything is loaded
    (dict(orth="square"), "--orth=square"),
    (dict(rslora=True), "--rslora: not with --method=adalora"),
])
def test_bad_config(base, demo_data, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train.train(ada_cfg(base, demo_data, tmp_path / "bad", **change))
    assert not os.path.exists(tmp_path / "bad" / "ckpt.pt")
