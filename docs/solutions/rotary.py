"""Reference solution: rotary position embedding on the right half (exercises/rotary.py)."""
import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    x_rotary, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rotary.chunk(2, dim=-1)  # dim i pairs with dim i + rotary_dim / 2
    rotate_half = torch.cat([-x2, x1], dim=-1)  # so that x cos + rotate_half sin = (x1 cos - x2 sin, x2 cos + x1 sin)
    return torch.cat([x_rotary * cos + rotate_half * sin, x_pass], dim=-1)
