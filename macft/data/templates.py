"""Turn a validated ``Record`` into token ids and a loss mask (``Example``).

- text: the tokenizer's own encoding (BOS as it adds it) plus EOS; every token is trained on.
- prompt/completion and Alpaca without a chat template: the prompt's tokens, then the completion's
  tokens and EOS. They are tokenized separately because at inference the prompt is encoded on its
  own and the model continues from there.
- chat-like data (and completions when a template is used): the tokenizer's chat template, with
  ``tools`` passed through. Each assistant turn's token span is found by rendering the conversation
  up to that turn (with and without the turn) and comparing token ids with the full rendering, so
  every assistant turn, including its end-of-turn token, is trained on. Templates that render the
  last turn differently (Qwen3's think block) fall back to the turn's closing marker.

    encoder = Encoder(tokenizer, use_chat_template=None, mask_prompt=True)
    example = encoder.encode(record)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from macft.models.chat_template import template_tokens
from macft.data.formats import Record
from macft.errors import MacftError


@dataclass
class Example:
    tokens: list[int]  # includes BOS/EOS as the tokenizer or template produces them
    mask: list[bool]  # True where the token is trained on (predicted from the tokens before it)
    source: str = ""  # "file:line"
    format: str = ""  # the shape the line came in (see macft.data.formats)

    @property
    def num_trained(self) -> int:
        """Tokens that count in the loss; the first token is never predicted."""
        return sum(self.mask[1:])


def uses_chat_template(tokenizer: Any, wanted: bool | None) -> bool:
    """Whether text goes through the tokenizer's chat template: as ``wanted`` (data.use_chat_template),
    or, when that is None, whenever the tokenizer has one. Training, the demo, eval and chat all ask here."""
    has_template = bool(getattr(tokenizer, "has_chat_template", False))
    if wanted and not has_template:
        raise MacftError(
            "data.use_chat_template is true but this model's tokenizer has no chat template; "
            "set it to false (or leave it unset) or use a model with a template."
        )
    return has_template if wanted is None else wanted


class Encoder:
    """Tokenizes records with one tokenizer and one set of template and masking choices."""

    def __init__(self, tokenizer: Any, *, use_chat_template: bool | None = None, mask_prompt: bool = True):
        self.tokenizer = tokenizer
        self.use_chat_template = uses_chat_template(tokenizer, use_chat_template)
        self.mask_prompt = mask_prompt
        eos = tokenizer.eos_token_id
        if eos is None:
            raise MacftError("This model's tokenizer defines no EOS token, so examples cannot end; use another model.")
        self.eos = int(eos)

    def encode(self, record: Record) -> Example:
        if record.kind == "text":
            tokens = self._plain(record.text)
            if tokens[-1] != self.eos:
                tokens.append(self.eos)
            mask = [True] * len(tokens)
        elif record.kind == "completion" and not self.use_chat_template:
            prompt = self._plain(record.prompt + record.prompt_suffix)
            completion = list(self.tokenizer.encode(record.completion, add_special_tokens=False)) + [self.eos]
            tokens = prompt + completion
            mask = [not self.mask_prompt] * len(prompt) + [True] * len(completion)
        elif self.use_chat_template:
            tokens, mask = self._chat(record)
        else:
            raise MacftError(
                f"{record.source}: chat data needs a chat template, but data.use_chat_template is false or the "
                "tokenizer has none; use a model with a chat template or convert the data to prompt/completion."
            )
        return Example(tokens=tokens, mask=mask, source=record.source, format=record.format)

    def _plain(self, text: str) -> list[int]:
        tokens = list(self.tokenizer.encode(text))
        # A tokenizer that adds nothing (no BOS) on an empty prompt still needs one position to start from.
        return tokens or [self.eos]

    def _render(self, record: Record, messages: list[dict], generation_prompt: bool) -> list[int]:
        return template_tokens(self.tokenizer, messages, add_generation_prompt=generation_prompt, tools=record.tools, where=record.source)

    def _chat(self, record: Record) -> tuple[list[int], list[bool]]:
        messages = record.as_messages()
        tokens = self._render(record, messages, generation_prompt=False)
        if not self.mask_prompt:
            return tokens, [True] * len(tokens)
        mask = [False] * len(tokens)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not message.get("weight", 1):
                continue
            before = self._render(record, messages[:i], generation_prompt=True) if i else []
            through = self._render(record, messages[: i + 1], generation_prompt=False)
            start, end = _common_prefix(before, tokens), _common_prefix(through, tokens)
            if end < len(through):
                end = self._turn_end(record, through[len(before) :], tokens, start)
            mask[start:end] = [True] * (end - start)
        return tokens, mask

    def _turn_end(self, record: Record, turn: list[int], tokens: list[int], start: int) -> int:
        """Where an assistant turn ends in the full rendering when the template renders a final
        turn differently from an earlier one (Qwen3 adds an empty think block to the last turn):
        at the first occurrence, after ``start``, of the turn's closing marker (its last special
        token and whatever follows it)."""
        special = set(getattr(self.tokenizer, "all_special_ids", [])) | {self.eos}
        marks = [i for i, t in enumerate(turn) if t in special]
        if marks:
            tail = turn[marks[-1] :]
            for at in range(start + 1, len(tokens) - len(tail) + 1):
                if tokens[at : at + len(tail)] == tail:
                    return at + len(tail)
        raise MacftError(
            f"{record.source}: the chat template renders this conversation differently turn by turn, so its "
            "assistant turns cannot be located; set data.mask_prompt=false to train on every token."
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
