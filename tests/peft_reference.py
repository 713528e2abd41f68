"""The reference side of the PEFT tests: transformers + PEFT on CPU torch, in a process of its own.

torch must not share a process with MLX here: macft loads its OpenBLAS with global symbols, and
torch's batched matmuls then crash (Qwen3.5's gated delta rule does, in torch 2.13). So a test module
starts this script once (``Reference``, below; torch is imported only in the child) and sends it
requests, one JSON object per line on stdin; each answer is one line on stdout starting with ``@@``:

    {"op": "logits", "model": DIR, "adapter": DIR or null, "ids": [...], "out": FILE.npy}
        -> {"warnings": [...]}          PeftModel.from_pretrained's warnings; logits saved to FILE.npy
    {"op": "save", "model": DIR, "config": {LoraConfig keywords}, "out": DIR, "seed": int or null}
        -> {}                           get_peft_model + save_pretrained; with a seed, every LoRA/DoRA
                                        weight is random (PEFT's own init has B = 0)
"""

from __future__ import annotations

import json
import logging
import selectors
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np


class Reference:
    """The client the tests use: this script in a child process, one request at a time, bounded in time."""

    def __init__(self, log: Path):
        self.log = Path(log).open("w")
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)

    def call(self, op: str, timeout: float = 180, **request) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.proc.stdin.flush()
        while True:
            if not self.selector.select(timeout):
                raise TimeoutError(f"the reference process did not answer '{op}' in {timeout}s (see {self.log.name})")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the reference process died (see {self.log.name})")
            if line.startswith("@@"):
                answer = json.loads(line[2:])
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer

    def logits(self, model: Path, adapter: Path | None, ids: list[int], out: Path) -> tuple[np.ndarray, list[str]]:
        """PEFT's logits for ``ids`` (the bare base when ``adapter`` is None) and the warnings loading it gave."""
        answer = self.call("logits", model=str(model), adapter=str(adapter) if adapter else None, ids=ids, out=str(out))
        return np.load(out), answer["warnings"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def base(model: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def logits(request: dict) -> dict:
    import torch
    from peft import PeftModel

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
    import torch
    from peft import LoraConfig, get_peft_model

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
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
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
