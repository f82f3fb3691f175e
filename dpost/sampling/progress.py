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

    def _postfix(self, pending_tokens: int = 0) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{(self.tokens + pending_tokens) / elapsed:.1f} tok/s", refresh=True)

    def tokens_so_far(self, chunk_tokens: int) -> None:
        """Mid-chunk update (at calculator round trips): tokens generated in the current chunk."""
        if self.bar is not None:
            self._postfix(chunk_tokens)

    def chunk_done(self, prompts: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(prompts)
            self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
