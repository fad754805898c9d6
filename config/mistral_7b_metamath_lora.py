# The LoRA twin of mistral_7b_metamath_beamlora.py: the same recipe with plain LoRA.
exec(open(__file__.replace("_lora.py", "_beamlora.py")).read())
method = "lora"
out_dir = "out/mistral_7b_metamath_lora"
