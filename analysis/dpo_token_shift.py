"""Where DPO moves the policy: per-token log-prob changes of DPO_k against its reference SFT_{k-1}
on iteration k's preference pairs, split by where the two sides of a pair diverge and by token kind.

    python analysis/dpo_token_shift.py WORKDIR [--iteration 1]   # WORKDIR: a finished dpo_st run

For each pair (chosen = a correct rationale, rejected = an incorrect one, tokenized as the DPO stage
does), each completion token's shift is log p_DPO(token) - log p_SFT(token). A pair's DPO margin
(the implicit reward margin over beta) is the chosen side's summed shift minus the rejected side's.
The tokens before the sides' first differing token are the same on both sides and cancel; the rest
is split into the first differing token itself and the tokens after it, each as *forced* (a calculator
result and closing marker, which sampling never draws: the calculator forces them; found by
`forcing.forced_positions`, a replay of the sampler), *numeric*
(another sub-word piece with a digit or one of `+-*/=<>#`: equations, the answer line) or *word*
(the phrasing). Also: how many pairs first differ at a numeric token (where a reasoning
step can go wrong) rather than in the wording, and the rejected side's numeric tokens lined up with
the chosen side's by order alone (wording ignored): those that agree so far, the first that does
not, and the rest.

Prints markdown tables (means over pairs, nats) and the share of the margin from each part.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
from etils import epath  # noqa: E402

from dpost import stages  # noqa: E402
from dpost.data import batching, pipeline  # noqa: E402
from dpost.models import scoring  # noqa: E402
from dpost.sampling import forcing  # noqa: E402
from dpost.sharding import Layout  # noqa: E402
from dpost.workdir import StageDir  # noqa: E402

NUMERIC = set("0123456789+-*/=<>#")
BATCH = 64


def token_kind(piece: str) -> str:
    return "numeric" if any(ch in NUMERIC for ch in piece) else "word"


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def numeric_steps(rejected: np.ndarray, chosen: np.ndarray, shift: np.ndarray, pieces) -> dict[str, float]:
    """The rejected side's numeric tokens, in order, against the chosen side's: the summed shift of
    those that agree with the chosen side's (the same numeric pieces so far: correct steps), of the
    first that does not (where the rejected rationale's numbers leave the correct ones) and of the
    rest. Wording is ignored, so two rationales phrased differently still line up."""
    rej = [(t, p) for t, p in enumerate(pieces(rejected.tolist())) if token_kind(p) == "numeric"]
    cho = [p for p in pieces(chosen.tolist()) if token_kind(p) == "numeric"]
    out = collections.Counter()
    off = next((j for j, (_, p) in enumerate(rej) if j >= len(cho) or cho[j] != p), len(rej))
    for j, (t, _) in enumerate(rej):
        part = "agreeing with the chosen side's" if j < off else "the first one off" if j == off else "after that"
        out[part] += float(shift[t])
    return out


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask):
    logits = module.apply({"params": params}, prompt, prompt_mask, completion, completion_mask,
                          method="completion_logits")
    return scoring.token_logprobs_from_logits(logits, completion)


def token_logprobs(bundle, items, side: str) -> list[np.ndarray]:
    """log p(token) of every completion token of `side`, per item."""
    p_len = batching.bucket_length(max(len(it["prompt"]) for it in items))
    c_len = batching.bucket_length(max(len(it[side]) for it in items))

    out = []
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        batch = pipeline.collate([{"prompt": it["prompt"], "completion": it[side]} for it in chunk],
                                 pad_id=bundle.pad_token_id, max_prompt_len=p_len, max_completion_len=c_len,
                                 batch_size=BATCH, keys=("completion",))
        batch = batching.pad_to_lengths(batch, p_len, c_len, bundle.pad_token_id)
        logps = np.asarray(_token_logprobs(bundle.module, bundle.params, batch["prompt"], batch["prompt_mask"],
                                           batch["completion"], batch["completion_mask"]))
        out += [logps[i, : len(it[side])] for i, it in enumerate(chunk)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--iteration", type=int, default=1)
    args = ap.parse_args()
    k = args.iteration

    def stage(name: str, iteration: int) -> StageDir:
        return StageDir(epath.Path(args.workdir) / f"iter_{iteration}" / name, "")

    reference = stages.load_stage_model(stage("sft", k - 1), Layout(), "float32")
    policy = stages.load_stage_model(stage("dpo", k), Layout(), "float32")
    rows = stages.read_pairs(stage("pairs", k))
    items, _, _ = stages._pair_items(reference, rows, 10**6, 10**6)
    shift = {}
    for side in ("chosen", "rejected"):
        before = token_logprobs(reference, items, side)
        after = token_logprobs(policy, items, side)
        shift[side] = [a - b for a, b in zip(after, before)]

    pieces = reference.tokenizer.convert_ids_to_tokens
    tables = forcing.tables_for(reference.tokenizer, reference.family, int(reference.config.vocab_size))
    parts = collections.defaultdict(list)  # (part, side) -> per-pair contribution to the margin
    numeric = collections.defaultdict(list)  # the rejected side's numeric tokens by step agreement
    prefix = []  # the shared prefix's shift (the same on both sides: it cancels in the margin)
    first_kind = collections.Counter()
    at_first = collections.defaultdict(list)
    for i, it in enumerate(items):
        d = first_difference(it["chosen"], it["rejected"])
        for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
            ids, s = it[side], shift[side][i]
            forced = forcing.forced_positions(reference.tokenizer, reference.family, ids, tables)
            kinds = ["forced" if f else token_kind(p) for f, p in zip(forced, pieces(ids.tolist()))]
            contrib = collections.Counter()
            if sign > 0:
                prefix.append(float(s[:d].sum()))
            if d < len(ids):
                contrib[f"first differing token ({kinds[d]})"] += float(s[d])
                at_first[(side, kinds[d])].append(float(s[d]))
            for t in range(d + 1, len(ids)):
                contrib[f"after it, {kinds[t]}"] += float(s[t])
            if side == "rejected":  # its numeric tokens against the chosen side's (the steps)
                for part, value in numeric_steps(ids, it["chosen"], s, pieces).items():
                    numeric[part].append(value)
            for part, value in contrib.items():
                parts[(part, side)].append(sign * value)
        if d < min(len(it["chosen"]), len(it["rejected"])):
            first_kind[token_kind(pieces([int(it["chosen"][d])])[0])] += 1

    n = len(items)
    margins = np.array([shift["chosen"][i].sum() - shift["rejected"][i].sum() for i in range(n)])
    print(f"# {args.workdir}, iteration {k}: {n} pairs; DPO_{k} vs SFT_{k - 1}; margin (chosen shift - rejected "
          f"shift) mean {margins.mean():+.3f} nats, positive in {np.mean(margins > 0):.0%} of pairs")
    print(f"# first differing token: numeric in {first_kind['numeric']} pairs, word in {first_kind['word']} "
          f"(of {sum(first_kind.values())} where both sides continue)")
    print(f"# shared prefix (before the first difference; cancels): shift {np.mean(prefix):+.3f} nats per side")
    print("| part of the margin | side | mean per pair (nats) | share of the margin |")
    print("| --- | --- | --- | --- |")
    for (part, side), values in sorted(parts.items()):
        total = float(np.sum(values)) / n  # pairs without the part count as 0
        print(f"| {part} | {side} | {total:+.4f} | {total / margins.mean():.0%} |")
    print("| the rejected side's numeric tokens, in order against the chosen side's | mean per pair (nats) | pairs with it |")
    print("| --- | --- | --- |")
    for part in ("agreeing with the chosen side's", "the first one off", "after that"):
        print(f"| {part} | {-float(np.sum(numeric[part])) / n:+.4f} (margin) | {len(numeric[part])} |")
    print("| shift of the first differing token itself | side, kind | mean (nats) | pairs |")
    print("| --- | --- | --- | --- |")
    for (side, kind), values in sorted(at_first.items()):
        print(f"| first differing token | {side}, {kind} | {np.mean(values):+.4f} | {len(values)} |")


if __name__ == "__main__":
    main()
