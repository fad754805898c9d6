# The LoRA twin of llama2_13b_commonsense_beamlora.py: the same recipe with plain LoRA.
exec(open(__file__.replace("_lora.py", "_beamlora.py")).read())
method = "lora"
out_dir = "out/llama2_13b_commonsense_lora"
