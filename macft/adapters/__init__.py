"""Adapter files: the formats an adapter is written in and read from.

``files.py`` reads and writes macft's own (``adapters.safetensors`` + ``adapter_config.json`` in a run
directory, with the method and the base it was trained on); ``peft.py`` reads and writes Hugging
Face PEFT LoRA/DoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``), the format
transformers, vLLM, TGI, Unsloth, TRL and axolotl share.
"""
