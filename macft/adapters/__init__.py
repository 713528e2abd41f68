"""Adapter files: what a run leaves behind so chat, eval, fuse and export can put the method back on its base.

``macft.adapters.files`` reads and writes macft's own format (``adapters.safetensors`` +
``adapter_config.json`` in a run directory).
"""
