"""What a model's configuration claims, checked against what its files hold, before anything is built.

mlx-lm builds a model from its configuration before reading a single weight, one module per layer,
and MLX holds every shape dimension in a 32-bit integer. So a config.json, or a GGUF file's metadata,
that claims 100,000 layers costs gigabytes and minutes before the weights are ever compared with it,
and one that claims a width above 2,147,483,647 ends in an OverflowError deep inside MLX. Here the
claims are checked first, in time and memory proportional to the files: every integer must fit
MLX's dimensions, and a model may claim no more layers than its weight files hold (a config read
without its weights, a hub id's for the planner, no more than ``MAX_LAYERS_UNSEEN``).

    check_folder_claims(model_dir)              # before mlx-lm builds a model folder
    check_gguf_claims(gguf, config)             # a GGUF import, before the model is built
    check_config_claims(config, "Org/Name")     # a config without weights
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from macft.errors import MacftError

MAX_DIMENSION = 2**31 - 1  # MLX's shape dimensions are int32
# Without weights to count, a claimed depth is taken up to this; released models have at most a few hundred layers.
MAX_LAYERS_UNSEEN = 1024
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on a header
# The sizes mlx-lm builds modules from: each must be a whole number of at least 1 (or absent / null
# where the architecture allows it).
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_folder_claims(model_dir: Path) -> None:
    """Refuse a model folder whose config.json claims sizes MLX cannot hold or more layers than its
    weight files (``model*.safetensors``, mlx-lm's pattern) have; reads only the files' headers."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise MacftError(f"{path} is not readable JSON ({_first_line(exc)}); download or convert the model again.") from None
    if not isinstance(config, dict):
        raise MacftError(f"{path} must hold a JSON object of settings; download or convert the model again.")
    files = sorted(model_dir.glob("model*.safetensors"))
    names = [name for file in files for name in safetensors_names(file)]
    check_config_claims(config, str(path), layers_present=_distinct_layers(names) if files else None)


def check_gguf_claims(gguf: Any, config: dict) -> None:
    """``check_config_claims`` for the config a GGUF import derived from ``gguf``'s metadata, against
    the blocks (``blk.N.*``) the file holds tensors for."""
    blocks = {name.split(".")[1] for name in gguf.tensors if name.startswith("blk.") and name.count(".") >= 2}
    check_config_claims(config, f"{gguf.path} (metadata)", layers_present=len(blocks))


def check_config_claims(config: dict, where: str, layers_present: int | None = None) -> None:
    """One ``MacftError`` for a config whose sizes are not whole numbers, do not fit MLX's dimensions,
    or claim more layers than ``layers_present`` (``MAX_LAYERS_UNSEEN`` when unknown)."""
    for section in _sections(config):
        for key in SIZE_KEYS:
            value = section.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MacftError(f"{where}: '{key}' must be a whole number of at least 1, not {_short(value)}; the model's configuration is damaged.")
    for key, value in _integers(config):
        if abs(value) > MAX_DIMENSION:
            raise MacftError(
                f"{where}: '{key}' is {value:,}, more than MLX can hold in one dimension ({MAX_DIMENSION:,}); "
                "the model's configuration is damaged."
            )
    for section in _sections(config):
        layers = section.get("num_hidden_layers")
        if layers is None:
            continue
        if layers_present is None and layers > MAX_LAYERS_UNSEEN:
            raise MacftError(f"{where}: 'num_hidden_layers' is {layers:,}; macft reads models of up to {MAX_LAYERS_UNSEEN:,} layers.")
        if layers_present is not None and layers > layers_present:
            raise MacftError(
                f"{where}: 'num_hidden_layers' is {layers:,} but the weights hold {layers_present:,} layers; "
                "the configuration does not belong to these weights."
            )


def safetensors_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header, read within the file's own size."""
    try:
        with file.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            available = file.stat().st_size - 8
            if not 0 < size <= min(available, MAX_HEADER_BYTES):
                raise ValueError(f"a header of {size:,} bytes in a file of {available + 8:,}")
            header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:
        raise MacftError(f"Could not read the weights in {file} ({_first_line(exc)}); download or convert the model again.") from None
    return [name for name in header if name != "__metadata__"]


def _distinct_layers(names: Iterable[str]) -> int:
    return len({match[1] for name in names if (match := _LAYER_INDEX.search(name))})


def _sections(config: dict) -> list[dict]:
    """The config and the decoder's nested config (multimodal wrappers keep it in ``text_config``)."""
    nested = config.get("text_config")
    return [config, nested] if isinstance(nested, dict) else [config]


def _integers(value: Any, key: str = "", depth: int = 0) -> Iterator[tuple[str, int]]:
    """Every integer in a JSON value, with the key it sits under."""
    if depth > 32:  # deeper than any real config; json itself bounds the nesting
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _integers(v, str(k), depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _integers(item, key, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool):
        yield key, value


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
