"""CPU time of decoding every tensor of the embedded Gemma 3 270M GGUF: ``macft.quants.decode``
against gguf-py's own ``gguf.quants.dequantize`` (what macft called before), per tensor type.

    python scripts/bench_quants.py --rounds 3

Each round decodes all tensors of each type once with each decoder, interleaved; the figure per
decoder and type is the round with the least CPU time (this process's, so other processes on a
shared machine disturb it less than wall time). Both decoders' values are checked to be equal
bit for bit first. Results go to ``scripts/results/bench-quants-decode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench-quants-decode.json")
    args = parser.parse_args()

    import macft  # noqa: F401  (loads the BLAS first, as every macft entry point does)
    from gguf import quants as gguf_quants

    from macft.models.gguf_import.reader import read_gguf
    from macft.models.spec import embedded_default_gguf
    from macft.quants import decode

    gguf = read_gguf(embedded_default_gguf())
    by_type: dict = {}
    for name, info in gguf.tensors.items():
        by_type.setdefault(info.qtype, []).append(name)
    decoders = {
        "macft": decode,
        "gguf-py": lambda rows, qtype: gguf_quants.dequantize(rows, qtype),
    }
    results = {}
    for qtype, names in by_type.items():
        for name in names:
            ours, theirs = (f(gguf.rows(name), qtype).astype(np.float32) for f in decoders.values())
            assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), name
        best = {label: float("inf") for label in decoders}
        for _ in range(args.rounds):
            for label, decoder in decoders.items():
                start = time.process_time()
                for name in names:
                    decoder(gguf.rows(name), qtype)
                best[label] = min(best[label], time.process_time() - start)
        weights = sum(int(np.prod(gguf.tensors[n].shape)) for n in names)
        results[qtype.name] = {"tensors": len(names), "weights": weights, **{f"{k}_cpu_seconds": round(v, 3) for k, v in best.items()}}
        print(qtype.name, results[qtype.name], flush=True)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": os.uname().machine,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "rounds": args.rounds,
        "types": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
