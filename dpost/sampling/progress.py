"""Progress bar for long sampling runs: prompts done and generated tokens per second (tqdm)."""

from __future__ import annotations

import time


class Progress:
    """A tqdm bar over prompts with a tokens/s postfix; a no-op when disabled."""

    def __init__(self, total_prompts: int, enabled: bool, desc: str = "sampling"):
        self.bar = None
        self.tokens = 0
        self.start = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_prompts, desc=desc, unit="prompt", dynamic_ncols=True)

    def update(self, prompts: int, tokens: int, pending: int = 0) -> None:
        """`prompts` more done with `tokens` generated; `pending`: tokens of rows still running."""
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(prompts)
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{(self.tokens + pending) / elapsed:.1f} tok/s", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
