"""Next-token scoring of answer letters, fast: the few-shot prefix that a subject's prompts share is run once and
its keys/values reused by every question; questions go through in batches; all letters of a question are read
from the one forward pass (the logits at its last token).

Sharing is found on token ids, not on text: each prompt is encoded whole, as it would be one at a time, and the
longest run of ids common to the group is the prefix. A prompt split at the text boundary would encode
differently (SentencePiece adds a dummy-prefix "▁" at the start of every encode), so this keeps the scores equal
to those of one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from baichuan.kv_cache import KVCache
from baichuan.memory import keep_freed_memory


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest run of ids that every prompt starts with."""
    first = prompts[0]
    n = min(map(len, prompts))
    for ids in prompts[1:]:
        i = 0
        while i < n and ids[i] == first[i]:
            i += 1
        n = i
    return n


def _last_logits(
    model: nn.Module, hidden: torch.Tensor, last: torch.Tensor, choice_ids: torch.Tensor
) -> torch.Tensor:
    """Logits of the choice ids at each row's last real token: the head runs on B rows, not on B x T."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.lm_head(hidden[rows, last]).float()[:, choice_ids]  # (B, C)


@torch.inference_mode()
def score_choices(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    choice_ids: Sequence[int],
    batch_size: int = 8,
    *,
    share_prefix: bool = True,
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(N, C) logits of `choice_ids` as the next token after each prompt, in fp32 on the CPU.

    With `share_prefix`, the common prefix of all `prompts` is computed once (batch 1) and copied into the cache
    of each batch; only the rest of each prompt is run. Rows are right-padded: a causal model's real tokens never
    see the padding after them, so no mask is needed, and each row's logits are read at its own last token.
    `progress(n)` hears of every n questions done."""
    weight = model.model.embed_tokens.weight
    dtype, device = weight.dtype, weight.device
    if device.type == "cpu":
        keep_freed_memory()
    config = model.config
    choices = torch.as_tensor(list(choice_ids), dtype=torch.long, device=device)
    out = torch.empty(len(prompts), len(choices), dtype=torch.float32)
    if not prompts:
        return out
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")

    # Keep one token of every prompt out of the prefix: its logits are the ones read. A lone prompt has no one to
    # share with: one forward is cheaper than a prefix pass and a suffix pass.
    share_prefix = share_prefix and len(prompts) > 1
    P = min(common_prefix(prompts), min(map(len, prompts)) - 1) if share_prefix else 0
    prefix = None
    if P > 0:
        prefix = KVCache.for_model(config, 1, P, dtype, device)
        model.model(torch.as_tensor([list(prompts[0][:P])], device=device), 0, prefix)

    # Similar lengths together: less padding. Results go back to the prompts' order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        tails = [list(prompts[i][P:]) for i in rows]
        B, T = len(rows), max(map(len, tails))
        idx = torch.full((B, T), pad_id, dtype=torch.long)
        for r, ids in enumerate(tails):
            idx[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        idx = idx.to(device)
        last = torch.as_tensor([len(t) - 1 for t in tails], device=device)
        if prefix is None:
            hidden = model.model(idx)  # a fresh causal forward: no cache needed
        else:
            cache = KVCache.for_model(config, B, P + T, dtype, device)
            cache.k[:, :, :, :P] = prefix.k  # (L, 1, H, P, D) broadcast to every row
            cache.v[:, :, :, :P] = prefix.v
            hidden = model.model(idx, P, cache)
        out[torch.as_tensor(rows)] = _last_logits(model, hidden, last, choices).cpu()
        if progress is not None:
            progress(B)
    return out
