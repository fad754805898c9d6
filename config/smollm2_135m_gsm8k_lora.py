# The LoRA twin of smollm2_135m_gsm8k_beamlora.py: the same recipe with plain LoRA.
exec(open(__file__.replace("_lora.py", "_beamlora.py")).read())
method = "lora"
out_dir = "out/smollm2_135m_gsm8k_lora"
