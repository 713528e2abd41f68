"""The reference side of the PEFT tests: transformers + PEFT on CPU torch, in a process of its own.

torch must not share a process with MLX here: macft loads its OpenBLAS with global symbols, and
torch's batched matmuls then crash (Qwen3.5's gated delta rule does, in torch 2.13). So the tests
start this script once (``tests/test_peft_format.py``'s ``reference`` fixture) and send it requests,
one JSON object per line on stdin; each answer is one line on stdout starting with ``@@``:

    {"op": "logits", "model": DIR, "adapter": DIR or null, "ids": [...], "out": FILE.npy}
        -> {"warnings": [...]}          PeftModel.from_pretrained's warnings; logits saved to FILE.npy
    {"op": "save", "model": DIR, "config": {LoraConfig keywords}, "out": DIR, "seed": int or null}
        -> {}                           get_peft_model + save_pretrained; with a seed, every LoRA/DoRA
                                        weight is random (PEFT's own init has B = 0)
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

torch.set_num_threads(1)
hf_logging.disable_progress_bar()


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def base(model: str):
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def logits(request: dict) -> dict:
    model = base(request["model"])
    messages: list[str] = []
    if request.get("adapter"):
        handler = Collect()
        logging.getLogger("peft").addHandler(handler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(model, request["adapter"]).eval()
        logging.getLogger("peft").removeHandler(handler)
        messages = [f"{w.category.__name__}: {w.message}" for w in caught] + handler.messages
    with torch.no_grad():
        values = model(torch.tensor([request["ids"]])).logits[0].numpy()
    np.save(request["out"], values.astype(np.float32))
    return {"warnings": messages}


def save(request: dict) -> dict:
    model = get_peft_model(base(request["model"]), LoraConfig(**request["config"]))
    if request.get("seed") is not None:
        generator = torch.Generator().manual_seed(int(request["seed"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
                elif "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(request["out"])
    return {}


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"logits": logits, "save": save}[request["op"]](request)
        except Exception:
            answer = {"error": traceback.format_exc()}
        sys.stdout.write("@@" + json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
