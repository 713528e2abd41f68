"""From a trained run to files other tools run: fuse, GGUF (full or LoRA adapter) and Ollama Modelfiles.

| module | job |
|---|---|
| ``fuse`` | base + adapter merged in float32, saved as an MLX model directory (``macft fuse``) |
| ``pipeline`` | ``macft export gguf`` as one call: choose the weights, write the GGUF and the Modelfile |
| ``gguf_writer`` | an mlx-lm model -> a GGUF file (metadata, tensors packed by ``macft.quants``, atomic write) |
| ``families`` | per-family GGUF architecture keys, tensor names and layouts |
| ``tokenizer_meta`` | the ``tokenizer.*`` keys (SentencePiece, byte-level BPE, or copied from a source GGUF) |
| ``quant_plan`` | llama-quantize's per-tensor type rules for each ``--quant``, and the delta-aware upgrades |
| ``imatrix`` | a run's importance matrix: mean x² per input column of each linear layer on its training data |
| ``guidance`` | what a run tells the quantizer: that matrix, and how much the fine-tune changed each weight |
| ``fidelity`` | the exported file against the fused float model on the run's validation data |
| ``adapter_gguf`` | a LoRA adapter as a llama.cpp ``--lora`` GGUF |
| ``modelfile`` | Ollama Modelfile with a Go TEMPLATE for the known chat formats |
| ``apps`` | hands a GGUF to Ollama (``ollama create``) and LM Studio (its models folder) |
"""
