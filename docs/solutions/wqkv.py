"""Reference solution: split the legacy fused Wqkv (exercises/wqkv.py)."""
import torch


def split_wqkv(weight: torch.Tensor, bias: torch.Tensor, hidden_size: int) -> dict:
    # One row of W per output: the fused layer's 3 * hidden outputs are q's, then k's, then v's ([Q; K; V]).
    parts = {}
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(index * hidden_size, (index + 1) * hidden_size)
        parts[name] = (weight[rows].clone(), bias[rows].clone())  # clone: own storage, not a view of the fused one
    return parts
