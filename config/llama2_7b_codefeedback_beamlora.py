# BeamLoRA, the paper's recipe (Table 4; BEAMLORA.md section 2): Llama-2-7b-hf on Code-Feedback.
# python train.py config/llama2_7b_codefeedback_beamlora.py     (or torchrun --nproc_per_node=N train.py ...)
init_from = "checkpoints/Llama-2-7b-hf"  # an HF checkpoint directory
data = "data/code_feedback/train.jsonl"  # made by data/code_feedback/prepare.py
data_format = "alpaca_chat"  # messages in the Alpaca template, as eval.py's humaneval/mbpp prompt; the authors
# train on fxmeng/CodeFeedback-Python105K (data/README.md)
out_dir = "out/llama2_7b_codefeedback_beamlora"
method = "beamlora"
r = 64
alpha = 128.0
dropout = 0.05
p_init = 0.95
dt = 1200
targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
batch_size = 32
micro_batch_size = 4
epochs = 3
lr = 3e-4
dtype = "bfloat16"
gradient_checkpointing = True  # fits a 24 GB GPU; turn off on larger GPUs for speed
max_len = 1024
warmup_ratio = 0.03
schedule = "cosine"
