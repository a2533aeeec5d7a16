"""
Exercise: attention from q, k and v (course part 2; imp.py section 2).

Write `attention`. Check it with:  python -m pytest exercises/ -k attention
"""
import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Scaled dot-product attention, written out.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) -> (B, H, Tq, D).
    1. scores = q k^T / sqrt(D), computed in float32: (B, H, Tq, Tk).
    2. With `causal`, query i may not look at keys after its own position. The queries are the LAST Tq positions
       of the Tk keys (with a KV cache, the keys include earlier tokens), so query i sees keys 0 .. i + (Tk - Tq).
       Give the masked scores -inf.
    3. softmax over the keys, then cast the probabilities to v's dtype and multiply by v.
    """
    raise NotImplementedError("write attention(q, k, v, causal)")
