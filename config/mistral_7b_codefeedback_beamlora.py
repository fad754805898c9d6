# BeamLoRA, the paper's recipe (Table 4; BEAMLORA.md section 2): Mistral-7B-v0.1 on Code-Feedback.
# python train.py config/mistral_7b_codefeedback_beamlora.py     (or torchrun --nproc_per_node=N train.py ...)
init_from = "checkpoints/Mistral-7B-v0.1"  # an HF checkpoint directory
data = "data/code_feedback/train.jsonl"  # made by data/code_feedback/prepare.py
data_format = "alpaca_chat"  # messages in the Alpaca template, as eval.py's humaneval/mbpp prompt; the authors
# train on fxmeng/CodeFeedback-Python105K (data/README.md)
out_dir = "out/mistral_7b_codefeedback_beamlora"
method = "beamlora"
r = 64
alpha = 128.0
dropout = 0.05
p_init = 0.95
dt = 800
targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
batch_size = 32
micro_batch_size = 4
epochs = 3
dtype = "bfloat16"
gradient_checkpointing = True  # fits a 24 GB GPU; turn off on larger GPUs for speed
max_len = 1024
warmup_ratio = 0.03
schedule = "cosine"
# the authors train Mistral-7B with lr below 1e-4 and then use tau = 0.03 (their README);
# BEAMLORA.md does not give the exact lr: 5e-5 is our choice
lr = 5e-5
tau = 0.03
