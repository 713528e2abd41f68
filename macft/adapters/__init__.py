"""Adapter files: the formats an adapter is written in and read from.

``peft.py`` reads and writes Hugging Face PEFT LoRA/DoRA adapters (``adapter_config.json`` +
``adapter_model.safetensors``), the format transformers, vLLM, TGI, Unsloth, TRL and axolotl share.
"""
