"""Training losses: masked token NLL (SFT) and the DPO family of preference losses.

All functions are pure jnp and shape-polymorphic; the step builders in `steps.py` call them inside
one jitted program. Per-token log-probs always come from `dpost.models.scoring` (one fp32
log-softmax), never from a second implementation here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def masked_nll(token_logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over masked tokens, number of masked tokens), both fp32 scalars.

    Returning the sum and the count (not their ratio) lets a caller divide by the token count of
    the *global* batch, across devices and gradient-accumulation micro-batches.
    """
    mask = mask.astype(jnp.float32)
    return -(token_logps.astype(jnp.float32) * mask).sum(), mask.sum()


def sft_loss(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean NLL over the target tokens of the whole batch (prompt and padding masked out).

    token_logps, mask: [B, C]. A mean over tokens, not a mean of per-row means (as transformers'
    causal-LM loss with labels -100 on prompt and padding).
    """
    total, count = masked_nll(token_logps, mask)
    return total / jnp.maximum(count, 1.0)


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO losses and implicit rewards.

    Inputs are summed completion log-probs per pair ([B] each) under the policy and the reference.
    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):

      sigmoid  -(1-e) log s(beta h) - e log s(-beta h)        (the paper's loss; e > 0: cDPO)
      robust   (-(1-e) log s(beta h) + e log s(-beta h)) / (1 - 2e)   (rDPO, unbiased under noise)
      hinge    relu(1 - beta h)                                 (SLiC)
      ipo      (h' - 1/(2 beta))^2  where h' uses per-token mean log-ratios when
               `chosen_lengths`/`rejected_lengths` (completion token counts) are given, as TRL does;
               without lengths the inputs are taken as already normalised.

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are
    beta * (policy - reference) of the summed log-probs and carry no gradient.
    All arithmetic is fp32.
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    policy_chosen, policy_rejected = f32(policy_chosen), f32(policy_rejected)
    ref_chosen, ref_rejected = f32(ref_chosen), f32(ref_rejected)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("ipo: pass both chosen_lengths and rejected_lengths, or neither")
        if chosen_lengths is not None:
            h = chosen_ratio / jnp.maximum(f32(chosen_lengths), 1.0) - rejected_ratio / jnp.maximum(
                f32(rejected_lengths), 1.0
            )
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
    return losses, chosen_rewards, rejected_rewards
