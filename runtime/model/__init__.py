"""The fast path: a torch-native Llama-family decoder and a tokenizer that import no transformers code.

Importing transformers' modeling code costs ~3 s on our machines, twice the `import torch` floor,
so the function runtime builds models from `config.json` with this package instead; transformers
remains the converter and the fallback for other architectures (runtime/loader/hf_model.py).
"""
