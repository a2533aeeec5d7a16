"""Reference solution: attention from q, k and v (exercises/attention.py)."""
import math

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    query_len, key_len = q.shape[-2], k.shape[-2]
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if causal:
        # Query i is position i + (Tk - Tq) of the keys: it may look at keys up to there.
        allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=q.device).tril(diagonal=key_len - query_len)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v
