"""SFT and DPO training: losses, optimizer schedule, jitted (sharded) steps, train loop, checkpoints.

    from dpost import training
    tx = training.make_optimizer(training.OptimizerConfig(learning_rate=3e-4, total_steps=n, ...))
    state = training.create_train_state(params, tx, rng=0, shardings=...)
    step = training.make_sft_step(module, tx, lr_schedule=training.make_schedule(opt_cfg), grad_accum=2)
    result = training.run(step, state, data, training.LoopConfig(num_steps=n), checkpoint_dir=...)

    training.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1,
                      loss_type="sigmoid", label_smoothing=0.0) -> (losses, chosen_rewards, rejected_rewards)
"""

from dpost.training.checkpoints import (
    CheckpointMismatchError,
    Checkpointer,
    Preempted,
    PreemptionGuard,
    restore_params,
)
from dpost.training.loop import (
    LoopConfig,
    LoopResult,
    MetricLogger,
    count_tokens,
    evaluate_dpo,
    evaluate_sft,
    put_batch,
    run,
    steps_for_epochs,
)
from dpost.training.losses import LOSS_TYPES, dpo_loss, masked_nll, sft_loss
from dpost.training.optimizer import (
    OptimizerConfig,
    decay_mask,
    final_params,
    make_optimizer,
    make_schedule,
    warmup_steps,
)
from dpost.training.state import TrainState, abstract_state, create_train_state, state_shardings
from dpost.training.steps import (
    DPO_METRICS,
    DPOConfig,
    Step,
    make_dpo_eval_step,
    make_dpo_step,
    make_reference_fn,
    make_sft_eval_step,
    make_sft_step,
    pair_token_logprobs,
    reference_logps,
    sft_token_logprobs,
)

__all__ = [
    "CheckpointMismatchError", "Checkpointer", "DPOConfig", "DPO_METRICS", "LOSS_TYPES",
    "LoopConfig", "LoopResult", "MetricLogger", "OptimizerConfig", "Preempted", "PreemptionGuard", "Step",
    "TrainState", "abstract_state", "count_tokens", "create_train_state", "decay_mask",
    "dpo_loss", "evaluate_dpo", "evaluate_sft", "final_params", "make_dpo_eval_step", "make_dpo_step", "make_optimizer",
    "make_reference_fn", "make_schedule", "make_sft_eval_step", "make_sft_step", "masked_nll",
    "pair_token_logprobs", "put_batch", "reference_logps", "restore_params", "run", "sft_loss",
    "sft_token_logprobs", "state_shardings", "steps_for_epochs", "warmup_steps",
]
