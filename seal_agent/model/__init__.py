"""Transformers and peft mechanics, nothing about documents or versions: loading a
base model (the embedded GGUF or any local Hugging Face directory), matmul
precision, the grouped-query attention, generation (greedy and sampled decoding
loops), and the inner loop (a LoRA finetune on a list of examples). Imports only
config and errors."""
