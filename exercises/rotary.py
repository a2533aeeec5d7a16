"""
Exercise: rotary position embedding on the right half (course part 2; imp.py section 2).

Phi-2 rotates only the first `rotary_dim` dims of each head (32 of 80), in the GPT-NeoX "rotate-half" layout.
Write `apply_rotary`. Check it with:  python -m pytest exercises/ -k rotary
"""
import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, rotary_dim) as imp.rotary_cos_sin returns them -> (B, H, T, D).

    Split the rotated part x[..., :rotary_dim] into halves x1 (first rotary_dim / 2 dims) and x2 (the rest):
    dim i pairs with dim i + rotary_dim / 2 (NOT with its neighbour i + 1, which is the interleaved convention
    of the original RoFormer). Each pair turns by its angle:  (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    The dims from rotary_dim on pass through unchanged.
    """
    raise NotImplementedError("write apply_rotary(x, cos, sin, rotary_dim)")
