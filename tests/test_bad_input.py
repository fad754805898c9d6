# Bad input to train.py and eval.py from the command line: each of dozens of cases gives a non-zero exit,
# one `error:` line on stderr naming the option or file (and line), no traceback, and leaves what was
# already written (a finished run's ckpt.pt, adapter/ and records; an earlier eval's results) byte for byte.
# All cases run in one subprocess (tests/cli_cases.py), each script as __main__ with its real stderr.
import json
import os
import shutil

import pytest
import torch

import train
from conftest import ROOT
from test_resume import argv_of, python, tree
from test_train import cfg_for  # base, demo_data: fixtures in conftest.py

class Unsafe:  # what weights_only must refuse: unpickling it would call os.system
    def __reduce__(self):
        return os.system, ("true",)


def make_inputs(d, base, demo_data):
    """Bad files, each named for its case, in d."""
    train_lines = open(os.path.join(demo_data, "train.jsonl"), "rb").read().splitlines(keepends=True)
    ok = train_lines[0]
    files = {"bad_config.py": b"r = 8\nx = = 1\n", "garbage.model": b"not a tokenizer\n", "empty.jsonl": b"",
             "bad_json.jsonl": ok + b'{"query": "a", "resp\n', "no_field.jsonl": b'{"question": "a", "answer": "b"}\n',
             "number.jsonl": ok + b'{"query": "q", "response": 42}\n',
             "null.jsonl": b'{"query": "q", "response": null}\n',
             "latin1.jsonl": ok + '{"query": "caf\u00e9", "response": "x"}\n'.encode("latin-1"),
             "list.jsonl": b"[1, 2]\n", "tiny.jsonl": ok, "chat.jsonl": b'{"messages": "hi"}\n',
             "bad.txt": b"hello\nworld\n\xff\xfe\n", "a_file": b"x"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "datadir").mkdir()
    (d / "nocfg").mkdir()
    cfg = json.load(open(os.path.join(base, "config.json")))
    models = {"badjson": "{not json", "wrongtype": dict(cfg, vocab_size="lots"), "gpt2": dict(cfg, model_type="gpt2"),
              "missingkey": {k: v for k, v in cfg.items() if k != "hidden_size"},
              "zeroheads": dict(cfg, num_attention_heads=0),
              "smallvocab": dict(cfg, vocab_size=100), "truncated": cfg}
    for name, c in models.items():
        (d / name).mkdir()
        (d / name / "config.json").write_text(c if isinstance(c, str) else json.dumps(c))
        shutil.copy(os.path.join(base, "tokenizer.model"), d / name)
    weights = open(os.path.join(base, "model.safetensors"), "rb").read()
    (d / "truncated" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    (d / "notok").mkdir()  # eval: a model dir without tokenizer.model
    shutil.copy(os.path.join(base, "config.json"), d / "notok")
    shutil.copy(os.path.join(base, "model.safetensors"), d / "notok")
    q = b'{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\\n#### 5"}\n'  # gsm8k rows
    evals = {"eval_bad_json.jsonl": q + b'{"question": "a", "answ\n', "eval_latin1.jsonl": q + '{"question": '
             '"caf\u00e9", "answer": "#### 1"}\n'.encode("latin-1"), "eval_noanswer.jsonl": b'{"question": "q"}\n',
             "eval_number.jsonl": b'{"question": 7, "answer": "#### 7"}\n', "eval_null.jsonl": q + b'{"question": "q", '
             b'"answer": null}\n', "he_missing.jsonl": b'{"task_id": "t", "prompt": "def f():", "entry_point": "f"}\n'}
    for name, data in evals.items():
        (d / name).write_bytes(data)


def make_adapters(d, good):
    """Broken copies of the finished run's adapter/ (`good`), each named for its case, in d."""
    st = open(os.path.join(good, "adapter_model.safetensors"), "rb").read()
    cfg = json.load(open(os.path.join(good, "adapter_config.json")))
    for name, config, weights in (("ad_noconfig", None, st), ("ad_badjson", "{", st),
                                  ("ad_nor", {k: v for k, v in cfg.items() if k != "r"}, st),
                                  ("ad_pattern", dict(cfg, rank_pattern=["q_proj", 2]), st),
                                  ("ad_wrongr", dict(cfg, r=2 * cfg["r"]), st),
                                  ("ad_trunc", cfg, st[:len(st) // 2]), ("ad_bin", cfg, None)):
        (d / name).mkdir()
        if config is not None:
            (d / name / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights is not None:
            (d / name / "adapter_model.safetensors").write_bytes(weights)
    (d / "ad_bin" / "adapter_model.bin").write_bytes(b"a pickle")


def corrupt(what, d):
    """Change a finished run's out_dir d as case `what` needs."""
    path = d / "ckpt.pt"
    if what == "no_ckpt":
        os.remove(path)
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif what == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 100)
    elif what == "pickle":
        torch.save({"step": 1, "params": Unsafe()}, path)
    elif what == "list":
        torch.save([1, 2, 3], path)
    elif what == "no_keys":
        torch.save({"step": 4}, path)
    elif what == "shapes":
        ck = torch.load(path, weights_only=True)
        name = next(iter(ck["params"]))
        ck["params"][name] = torch.zeros(3, 3)
        torch.save(ck, path)
    elif what == "records":
        (d / "log.jsonl").write_bytes(b"not json\n" + (d / "log.jsonl").read_bytes())


CUDA = "--device=cuda:99" if torch.cuda.is_available() else "--device=cuda"
# (id, arguments after the finished run's own, what the error line must name, change to its out_dir); {in}: the
# folder of bad files. Cases that start a fresh run pass --overwrite: a bad input must fail before it deletes.
CASES = [
    ("micro_batch_size_0", ["--micro_batch_size=0"], ["--micro_batch_size=0"], None),
    ("batch_size_0", ["--batch_size=0"], ["--batch_size=0"], None),
    ("batch_size_not_multiple", ["--batch_size=6"], ["--batch_size=6", "multiple"], None),
    ("max_steps_negative", ["--max_steps=-1"], ["--max_steps=-1"], None),
    ("epochs_0", ["--max_steps=0", "--epochs=0"], ["--epochs=0", "train nothing"], None),
    ("r_0", ["--r=0"], ["--r=0"], None),
    ("r_too_large", ["--r=1000"], ["r=1000 does not fit"], None),
    ("alpha_negative", ["--alpha=-1"], ["--alpha=-1"], None),  # 0 is 2 r
    ("dropout_1", ["--dropout=1.0"], ["--dropout=1.0"], None),
    ("tau_0", ["--tau=0"], ["--tau=0"], None),
    ("dt_odd", ["--dt=3"], ["--dt=3"], None),
    ("p_init_above_1", ["--p_init=1.5"], ["--p_init=1.5"], None),
    ("lr_negative", ["--lr=-0.1"], ["--lr=-0.1"], None),
    ("min_lr_above_lr", ["--min_lr=1.0"], ["--min_lr=1.0"], None),
    ("warmup_ratio_2", ["--warmup_ratio=2.0"], ["--warmup_ratio=2.0"], None),
    ("beta2_1", ["--beta2=1.0"], ["--beta2=1.0"], None),
    ("log_interval_0", ["--log_interval=0"], ["--log_interval=0"], None),
    ("save_interval_negative", ["--save_interval=-1"], ["--save_interval=-1"], None),
    ("max_len_1", ["--max_len=1"], ["--max_len=1"], None),
    ("method_unknown", ["--method=nope"], ["--method=nope"], None),
    ("dtype_unknown", ["--dtype=fp8"], ["--dtype=fp8"], None),
    ("targets_unknown", ["--targets=q_proj,qkv_proj"], ["--targets", "qkv_proj"], None),
    ("targets_empty_name", ["--targets=q_proj,,v_proj"], ["--targets"], None),
    ("device_cuda_absent", [CUDA], [CUDA], None),
    ("device_unknown", ["--device=gpu"], ["--device=gpu"], None),
    ("wandb_absent", ["--wandb_log"], ["--wandb_log"], None),
    ("option_unknown", ["--nope=1"], ["--nope"], None),
    ("option_wrong_type", ["--r=abc"], ["--r"], None),
    ("config_file_missing", ["{in}/missing.py"], ["missing.py"], None),
    ("config_file_syntax", ["{in}/bad_config.py"], ["bad_config.py:2", "SyntaxError"], None),
    ("two_models", ["--model_config={in}/gpt2/config.json"], ["--init_from", "--model_config"], None),
    ("init_from_missing", ["--init_from={in}/nothing"], ["nothing"], None),
    ("init_from_no_config", ["--init_from={in}/nocfg"], ["nocfg/config.json"], None),
    ("config_json_invalid", ["--init_from={in}/badjson"], ["badjson/config.json", "JSON"], None),
    ("config_json_wrong_type", ["--init_from={in}/wrongtype"], ["wrongtype/config.json", "vocab_size", "lots"], None),
    ("config_json_missing_key", ["--init_from={in}/missingkey"], ["missingkey/config.json", "hidden_size"], None),
    ("config_json_zero_heads", ["--init_from={in}/zeroheads"], ["zeroheads/config.json", "num_attention_heads"], None),
    ("config_json_model_type", ["--init_from={in}/gpt2"], ["gpt2/config.json", "model_type"], None),
    ("weights_truncated", ["--init_from={in}/truncated"], ["truncated/model.safetensors"], None),
    ("tokenizer_missing", ["--tokenizer={in}/nope.model"], ["nope.model"], None),
    ("tokenizer_garbage", ["--tokenizer={in}/garbage.model"], ["garbage.model"], None),
    ("tokenizer_above_vocab", ["--init_from={in}/smallvocab"], ["smallvocab/tokenizer.model", "vocab_size (100)"],
     None),
    ("data_missing", ["--data={in}/nothing.jsonl"], ["nothing.jsonl", "--data"], None),
    ("data_empty", ["--data={in}/empty.jsonl"], ["empty.jsonl", "empty"], None),
    ("data_a_directory", ["--data={in}/datadir"], ["datadir", "--data"], None),
    ("data_bad_json", ["--data={in}/bad_json.jsonl"], ["bad_json.jsonl:2", "JSON"], None),
    ("data_missing_field", ["--data={in}/no_field.jsonl"], ["no_field.jsonl:1", "'query'"], None),
    ("data_response_number", ["--data={in}/number.jsonl"], ["number.jsonl:2", "'response'", "int"], None),
    ("data_response_null", ["--data={in}/null.jsonl"], ["null.jsonl:1", "'response'", "NoneType"], None),
    ("data_not_utf8", ["--data={in}/latin1.jsonl"], ["latin1.jsonl:2", "UTF-8"], None),
    ("data_line_not_object", ["--data={in}/list.jsonl"], ["list.jsonl:1", "list"], None),
    ("data_smaller_than_a_batch", ["--data={in}/tiny.jsonl"], ["tiny.jsonl", "fewer than one global batch"], None),
    ("val_data_bad", ["--val_data={in}/bad_json.jsonl"], ["bad_json.jsonl:2"], None),
    ("chat_messages_not_a_list", ["--data={in}/chat.jsonl", "--data_format=alpaca_chat"], ["chat.jsonl:1", "messages"],
     None),
    ("chat_without_template", ["--data={in}/chat.jsonl", "--data_format=chat"],
     ["--data_format=chat", "no chat template"], None),
    ("text_not_utf8", ["--data={in}/bad.txt"], ["bad.txt:3", "UTF-8"], None),
    ("out_dir_a_file", ["--out_dir={in}/a_file"], ["a_file", "--out_dir"], None),
    ("resume_and_overwrite", ["--resume", "--overwrite"], ["--resume", "--overwrite"], None),
    # without --overwrite
    ("fresh_run_into_a_run", [], ["already holds a run", "--resume", "--overwrite"], "fresh"),
    ("resume_without_ckpt", ["--resume"], ["ckpt.pt", "no checkpoint"], "no_ckpt"),
    ("ckpt_empty", ["--resume"], ["ckpt.pt", "unreadable"], "empty"),
    ("ckpt_truncated", ["--resume"], ["ckpt.pt", "unreadable"], "truncated"),
    ("ckpt_garbage", ["--resume"], ["ckpt.pt", "unreadable"], "garbage"),
    ("ckpt_unsafe_pickle", ["--resume"], ["ckpt.pt", "refused unread"], "pickle"),
    ("ckpt_not_a_dict", ["--resume"], ["ckpt.pt", "not a train.py checkpoint"], "list"),
    ("ckpt_missing_keys", ["--resume"], ["ckpt.pt", "not a train.py checkpoint"], "no_keys"),
    ("ckpt_wrong_shapes", ["--resume"], ["ckpt.pt", "do not fit"], "shapes"),
    ("records_corrupt", ["--resume"], ["log.jsonl:1"], "records"),
    ("resume_changed_lr", ["--resume", "--lr=0.5"], ["--lr=0.5 (checkpoint: 0.01)"], None),
    ("resume_changed_r", ["--resume", "--r=2"], ["--r=2 (checkpoint: 4)"], None),
]


# eval.py: (id, arguments after a good evaluation's, what the error line must name); each over an out dir that
# holds an earlier evaluation's results
EVAL_CASES = [
    ("eval_task_unknown", ["--task=nope"], ["--task"]),
    ("eval_option_unknown", ["--nope=1"], ["--nope"]),
    ("eval_batch_size_0", ["--batch_size=0"], ["--batch_size"]),
    ("eval_limit_negative", ["--limit=-1"], ["--limit"]),
    ("eval_max_new_tokens_negative", ["--max_new_tokens=-1"], ["--max_new_tokens"]),
    ("eval_timeout_0", ["--timeout=0"], ["--timeout"]),
    ("eval_device_cuda_absent", [CUDA], [CUDA]),
    ("eval_device_unknown", ["--device=gpu"], ["--device"]),
    ("eval_dtype_unknown", ["--dtype=fp8"], ["--dtype"]),
    ("eval_out_a_file", ["--out={in}/a_file"], ["a_file", "--out"]),
    ("eval_model_missing", ["--model={in}/nothing"], ["nothing"]),
    ("eval_model_no_config", ["--model={in}/nocfg"], ["nocfg"]),
    ("eval_model_config_wrong_type", ["--model={in}/wrongtype"], ["wrongtype/config.json", "vocab_size"]),
    ("eval_weights_truncated", ["--model={in}/truncated"], ["truncated/model.safetensors"]),
    ("eval_model_no_tokenizer", ["--model={in}/notok"], ["notok/tokenizer.model"]),
    ("eval_tokenizer_above_vocab", ["--model={in}/smallvocab"], ["smallvocab/tokenizer.model", "vocab_size"]),
    ("eval_adapter_missing", ["--adapter={in}/nothing"], ["nothing"]),
    ("eval_adapter_no_config", ["--adapter={in}/ad_noconfig"], ["ad_noconfig/adapter_config.json"]),
    ("eval_adapter_config_invalid", ["--adapter={in}/ad_badjson"], ["ad_badjson/adapter_config.json", "JSON"]),
    ("eval_adapter_without_r", ["--adapter={in}/ad_nor"], ["ad_nor/adapter_config.json", "'r'"]),
    ("eval_adapter_rank_pattern_list", ["--adapter={in}/ad_pattern"],
     ["ad_pattern/adapter_config.json", "rank_pattern"]),
    ("eval_adapter_wrong_r", ["--adapter={in}/ad_wrongr"], ["ad_wrongr/adapter_model.safetensors", "shapes"]),
    ("eval_adapter_truncated", ["--adapter={in}/ad_trunc"], ["ad_trunc/adapter_model.safetensors"]),
    ("eval_adapter_pickle_only", ["--adapter={in}/ad_bin"], ["ad_bin/adapter_model.safetensors", "adapter_model.bin"]),
    ("eval_data_missing", ["--data={in}/nothing.jsonl"], ["nothing.jsonl"]),
    ("eval_data_bad_json", ["--data={in}/eval_bad_json.jsonl"], ["eval_bad_json.jsonl:2", "JSON"]),
    ("eval_data_not_utf8", ["--data={in}/eval_latin1.jsonl"], ["eval_latin1.jsonl:2", "UTF-8"]),
    ("eval_data_no_answer", ["--data={in}/eval_noanswer.jsonl"], ["eval_noanswer.jsonl:1", "'answer'"]),
    ("eval_data_question_a_number", ["--data={in}/eval_number.jsonl"], ["eval_number.jsonl:1", "'question'"]),
    ("eval_data_answer_null", ["--data={in}/eval_null.jsonl"], ["eval_null.jsonl:2", "'answer'"]),
    ("eval_humaneval_no_test", ["--task=humaneval", "--data={in}/he_missing.jsonl"], ["he_missing.jsonl:1", "'test'"]),
    ("eval_ppl_not_utf8", ["--task=ppl", "--data={in}/bad.txt"], ["bad.txt:3", "UTF-8"]),
]


@pytest.fixture(scope="module")
def cli_results(base, demo_data, tmp_path_factory):
    """Every case in one subprocess (tests/cli_cases.py): train.py's each over its own copy of a finished run,
    eval.py's each into an out dir holding an earlier evaluation's results."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "in").mkdir()
    make_inputs(tmp / "in", base, demo_data)
    prior = cfg_for(base, demo_data, tmp / "prior", max_steps=6, dt=2, end_step=6, score_log_interval=2,
                    log_interval=2)
    train.train(prior)
    cases, before = [], {}
    for name, args, _, change in CASES:
        d = tmp / name
        shutil.copytree(tmp / "prior", d)
        if change not in (None, "fresh"):
            corrupt(change, d)
        fresh = "--resume" not in args and change != "fresh"
        argv = (argv_of(dict(prior, out_dir=str(d))) + ["--overwrite"] * fresh
                + [a.format(**{"in": tmp / "in"}) for a in args])
        cases.append({"id": name, "script": "train.py", "argv": argv})
        before[name] = tree(d)
    make_adapters(tmp / "in", tmp / "prior" / "adapter")
    good_eval = [f"--model={base}", f"--adapter={tmp / 'prior' / 'adapter'}", "--task=gsm8k", "--limit=2",
                 f"--data={os.path.join(demo_data, 'test.jsonl')}", "--max_new_tokens=4", "--device=cpu"]
    for name, args, _ in EVAL_CASES:
        d = tmp / name
        d.mkdir()
        (d / "gsm8k_summary.json").write_text('{"accuracy": 0.5}\n')  # an earlier evaluation's results
        (d / "gsm8k_samples.jsonl").write_text('{"output": "x"}\n')
        argv = good_eval + [f"--out={d}"] + [a.format(**{"in": tmp / "in"}) for a in args]
        cases.append({"id": name, "script": "eval.py", "argv": argv})
        before[name] = tree(d)
    before["a_file"] = (tmp / "in" / "a_file").read_bytes()
    (tmp / "cases.json").write_text(json.dumps(cases))
    proc = python(os.path.join(ROOT, "tests", "cli_cases.py"), str(tmp / "cases.json"), str(tmp / "results.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "results.json").read_text()), before, tmp


@pytest.mark.parametrize("name, names", [(c[0], c[2]) for c in CASES + EVAL_CASES],
                         ids=[c[0] for c in CASES + EVAL_CASES])
def test_bad_input_one_line_and_nothing_lost(cli_results, name, names):
    if name == "wandb_absent" and __import__("importlib").util.find_spec("wandb"):
        pytest.skip("wandb is installed")
    results, before, tmp = cli_results
    res = results[name]
    err = res["stderr"]
    assert res["code"] != 0 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(n in err for n in names), err
    assert "weights_only=False" not in err  # never advise unpickling what was refused
    assert tree(tmp / name) == before[name]  # a finished run's ckpt.pt, adapter/, records; an eval's results
    if name in ("out_dir_a_file", "eval_out_a_file"):
        assert (tmp / "in" / "a_file").read_bytes() == before["a_file"]
