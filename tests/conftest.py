import os
import sys

import pytest

# tests import the top-level scripts (model.py, beamlora.py, ...) as modules
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama with the demo's sentencepiece tokenizer: enough to run eval.py end to end."""
    import importlib.util
    import shutil

    import torch
    from model import Transformer
    from tokenizer import Tokenizer
    spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(ROOT, "data", "demo", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    data = prep.prepare(str(tmp_path_factory.mktemp("demo")), seed=1, n_train=16, n_test=4, n_pretrain=400,
                        vocab_size=420)
    n_vocab = Tokenizer(os.path.join(data, "tokenizer.model")).n_words
    cfg = dict(model_type="llama", vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
               eos_token_id=2)
    torch.manual_seed(0)
    m = Transformer.from_config(cfg)
    with torch.no_grad():  # peaked next-token distributions: no near-ties for padding noise to flip
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if p.shape[0] == n_vocab else p.shape[1] ** -0.5)
    path = str(tmp_path_factory.mktemp("tiny"))
    m.save_pretrained(path)
    shutil.copy(os.path.join(data, "tokenizer.model"), path)
    return path


# The tiny demo task and checkpoint that train.py's tests share (test_train, test_resume, test_adalora, ...):
# built once per test module that uses them, as when each module imported them from test_train.py.
@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """Word problems and a sentencepiece tokenizer from the demo generator, at a tiny size."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(ROOT, "data", "demo", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    return prep.prepare(str(tmp_path_factory.mktemp("demo")), seed=1, n_train=64, n_test=8, n_pretrain=400,
                        vocab_size=420)


@pytest.fixture(scope="module")
def base(demo_data, tmp_path_factory):
    """A tiny random LLaMA checkpoint with the demo tokenizer."""
    import shutil

    import torch
    from model import Transformer
    from tokenizer import Tokenizer
    n_vocab = Tokenizer(os.path.join(demo_data, "tokenizer.model")).n_words
    cfg = dict(model_type="llama", vocab_size=n_vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
               eos_token_id=2)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base"))
    m = Transformer.from_config(cfg)
    with torch.no_grad():  # larger weights than a fresh init (std 0.02): a base whose features adapters can use
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if p.shape[0] == n_vocab else p.shape[1] ** -0.5)
    m.save_pretrained(path)
    shutil.copy(os.path.join(demo_data, "tokenizer.model"), path)
    return path


def free_port():
    """A TCP port nobody listens on now: torchrun tests running side by side must not share one."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
