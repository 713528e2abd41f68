"""GRPO: sample a group of answers per prompt, reward them, and push up the better ones.

For each prompt the policy samples G completions (mlx-lm's batched generation, ``align.temperature``);
the rewards r₁…r_G (``macft.objectives.rewards``) become group-normalised advantages
Aᵢ = (rᵢ − mean r) / (std r + 1e-4). Every completion token t then contributes

    −[ min(ρₜ·Aᵢ, clip(ρₜ, 1−ε, 1+ε)·Aᵢ) − β·KLₜ ],   ρₜ = π(t)/π_old(t),
    KLₜ = e^(ref−logπ) − (ref − logπ) − 1        (the unbiased k3 estimator of KL(π ‖ π_ref))

averaged over the completion's tokens and summed over completions. Each sampled batch is used for
one optimizer step, so π_old is the policy itself with its gradient stopped (ρ = 1 in value, the
clip matters only through ``token_objective``'s general form, which the tests exercise). The
reference is the base with adapters switched off, or a loaded copy for full fine-tuning.

Validation samples one greedy answer per held-out prompt; its loss is the negative mean reward, so
the best checkpoint and early stopping follow the held-out reward.

    loss = GRPOLoss(recipe.align, model, tokenizer, load_rewards(recipe.align.rewards, recipe.align.reward_timeout), chunk_size=512)
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from macft.data.batching import build_batch
from macft.data.prompts import PROMPTS, PromptBatch
from macft.data.templates import Example
from macft.methods import adapters_disabled
from macft.models.head import position_losses
from macft.models.tokenizer_cache import eager
from macft.objectives.base import LossContext, Metric, Objective
from macft.objectives.rewards import RewardProcess, beside_recipe, load_rewards, score
from macft.objectives.sequences import row_sums, trained_positions
from macft.options import Option

STATS = ("tokens", "reward", "reward_squared", "kl", "completion_tokens")


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """[prompts, G] rewards -> advantages normalised within each prompt's group."""
    mean = rewards.mean(axis=1, keepdims=True)
    return (rewards - mean) / (rewards.std(axis=1, keepdims=True) + 1e-4)


def token_objective(
    logps: mx.array, old_logps: mx.array, ref_logps: mx.array, advantages: mx.array, clip_epsilon: float, beta: float
) -> tuple[mx.array, mx.array]:
    """(loss, KL) per completion token (see the module docstring)."""
    ratio = mx.exp(logps - old_logps)
    clipped = mx.clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon)
    surrogate = mx.minimum(ratio * advantages, clipped * advantages)
    delta = ref_logps - logps
    kl = mx.exp(delta) - delta - 1
    return -(surrogate - beta * kl), kl


def sample(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_tokens: int, temperature: float) -> list[list[int]]:
    """One completion per prompt through mlx-lm's batched generation; a completion that stopped
    ends with EOS (so the policy learns to stop), one cut at ``max_tokens`` does not."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    out = batch_generate(
        model, tokenizer, prompts, max_tokens=max_tokens, sampler=make_sampler(temp=temperature), return_token_ids=True
    )
    eos = int(tokenizer.eos_token_id)
    return [list(t) + [eos] if len(t) < max_tokens else list(t) for t in out.token_ids]


class GRPOLoss:
    """The loop's loss for prompt batches: ``prepare`` samples and scores (host side, so the step
    itself stays a compiled function of arrays); ``__call__`` is the clipped, KL-penalised objective."""

    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        tokenizer: Any,
        rewards: RewardProcess,
        chunk_size: int,
        reference: nn.Module | None = None,
    ):
        self.cfg, self.model, self.tokenizer, self.rewards = cfg, model, tokenizer, rewards
        self.chunk_size, self.reference = chunk_size, reference

    def prepare(self, batch: PromptBatch) -> tuple[mx.array, ...]:
        training = self.model.training
        group = self.cfg.group_size if training else 1
        prompts = [p for p in batch.prompts for _ in range(group)]
        self.model.eval()  # no dropout while sampling
        completions = sample(
            self.model, self.tokenizer, [p.tokens for p in prompts], self.cfg.max_completion_tokens,
            self.cfg.temperature if training else 0.0,
        )
        if training:
            self.model.train()
        texts = [self.tokenizer.decode([t for t in c if t != self.tokenizer.eos_token_id]) for c in completions]
        rewards = score(self.rewards, texts, [p.fields for p in prompts], [p.source for p in prompts])
        advantages = group_advantages(rewards.reshape(-1, group)).reshape(-1) if training else np.zeros_like(rewards)
        examples = [
            Example(tokens=p.tokens + c, mask=[False] * len(p.tokens) + [True] * len(c)) for p, c in zip(prompts, completions)
        ]
        rows = build_batch(examples, [[i] for i in range(len(examples))], max(len(e.tokens) for e in examples))
        select, targets, weights, owner = trained_positions(rows.targets, rows.loss_mask)
        arrays = (rows.inputs, select, targets, weights, owner)
        ref = -self.reference_losses(arrays)
        position_advantages = mx.array(advantages.astype(np.float32))[owner]
        lengths = [len(c) for c in completions]
        totals = mx.array([float(sum(rewards)), float((rewards**2).sum()), float(sum(lengths))], mx.float32)
        return (*arrays, position_advantages, mx.stop_gradient(ref), totals)

    def reference_losses(self, arrays: tuple) -> mx.array:
        """−log p_ref at each completion token: the base with adapters off, or the loaded reference."""
        inputs, select, targets, weights, _ = arrays
        if self.reference is not None:
            return position_losses(self.reference, inputs, select, targets, weights, chunk_size=self.chunk_size, training=False)
        with adapters_disabled(self.model):
            return position_losses(self.model, inputs, select, targets, weights, chunk_size=self.chunk_size, training=False)

    def __call__(self, model: nn.Module, *arrays: mx.array, training: bool = True) -> tuple[mx.array, ...]:
        inputs, select, targets, weights, owner, advantages, ref_logps, totals = arrays
        losses = position_losses(model, inputs, select, targets, weights, chunk_size=self.chunk_size, training=training)
        logps = -losses
        token_loss, kl = token_objective(logps, mx.stop_gradient(logps), ref_logps, advantages, self.cfg.clip_epsilon, self.cfg.beta)
        rows = inputs.shape[0]
        tokens = row_sums(weights, owner, rows)
        per_row = row_sums(token_loss * weights, owner, rows) / mx.maximum(tokens, 1)
        kl_per_row = row_sums(kl * weights, owner, rows) / mx.maximum(tokens, 1)
        # Validation ranks checkpoints by held-out reward, so its "loss" is the negative reward.
        loss = per_row.sum() if training else -totals[0]
        stats = (weights.sum(), totals[0], totals[1], kl_per_row.sum(), totals[2])
        return (loss, mx.array(float(rows)), *(mx.stop_gradient(s) for s in stats))

    def evaluate(self, model: nn.Module, *arrays: mx.array) -> tuple[mx.array, ...]:
        return self(model, *arrays, training=False)

    @staticmethod
    def metrics(stats: list[float], completions: float) -> dict[str, float]:
        total = dict(zip(STATS, stats))
        mean = total["reward"] / completions
        return {
            "reward_mean": mean,
            "reward_std": max(total["reward_squared"] / completions - mean * mean, 0.0) ** 0.5,
            "kl": total["kl"] / completions,
            "completion_length": total["completion_tokens"] / completions,
        }


OPTIONS = (
    Option("beta", float, 0.1, "GRPO: the weight of the KL penalty", valid=lambda b: b > 0, must="positive"),
    Option("group_size", int, 4, "completions sampled per prompt", valid=lambda n: n >= 2, must="at least 2 (GRPO compares completions within a group)"),
    Option("temperature", float, 1.0, "sampling temperature"),
    Option("max_completion_tokens", int, 64, "the longest sampled completion", valid=lambda n: n >= 1, must="at least 1"),
    Option("clip_epsilon", float, 0.2, "the probability ratio is clipped to [1 - eps, 1 + eps]"),
    Option(
        "rewards", tuple[str, ...], ("exact_match",),
        "rewards, summed: exact_match[=field], json_valid, json_keys=a,b, regex=PATTERN, length_penalty=TOKENS, "
        "or your own module:function / file.py:function (completion, example) -> float",
        resolve=beside_recipe,
    ),
    Option(
        "reward_timeout", float, 5.0, "seconds one reward call may take (rewards run in a process of their own)",
        valid=lambda t: t > 0, must="positive",
    ),
)


def grpo_loss(context: LossContext) -> GRPOLoss:
    settings = context.settings
    rewards = load_rewards(settings.rewards, settings.reward_timeout)
    return GRPOLoss(settings, context.model, eager(context.tokenizer), rewards, context.chunk_size, context.reference)


OBJECTIVE = Objective(
    name="grpo",
    title="GRPO",
    when="you can score answers with a function (exact match, valid JSON, a regex, your own code) rather than write them",
    options=OPTIONS,
    data=PROMPTS,
    loss=grpo_loss,
    metrics=(
        Metric("reward_mean", "reward", "{:.3f}"),
        Metric("reward_std", "reward std", "{:.3f}"),
        Metric("kl", "kl", "{:.4f}"),
        Metric("completion_length", "length", "{:.1f}"),
    ),
    rows_per_example=lambda settings: settings.group_size,
    needs_reference=True,
    # Each rank would sample its own prompts' answers; the one-process loop samples a whole batch at once.
    distributed=False,
    lanes=False,  # its batches are sampled whole (splitting one would split the sampling)
    demo="greedy answers of the base and the tuned model to held-out prompts, scored against their answer field",
)
