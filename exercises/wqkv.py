"""
Exercise: split the legacy fused Wqkv (course part 3; imp.py section 10, key_table_phi).

The first Imp releases store Phi-2 in the MixFormer layout: one Linear `mixer.Wqkv` per layer computes q, k and v
at once. nanoImp has three Linears, q_proj, k_proj and v_proj. Write `split_wqkv`. Check it with:
    python -m pytest exercises/ -k wqkv
"""
import torch


def split_wqkv(weight: torch.Tensor, bias: torch.Tensor, hidden_size: int) -> dict:
    """weight: (3 * hidden_size, hidden_size), bias: (3 * hidden_size,) of the fused layer.

    Return {"q_proj": (weight, bias), "k_proj": (weight, bias), "v_proj": (weight, bias)}, each weight
    (hidden_size, hidden_size) and each bias (hidden_size,), such that nn.Linear with those tensors computes the
    same q, k and v as the fused layer. Decide from the shapes which dimension holds q, k and v one after the other
    (y = x W^T + b: one row of W per output). Return tensors that own their memory (not views into the fused one).
    """
    raise NotImplementedError("write split_wqkv(weight, bias, hidden_size)")
