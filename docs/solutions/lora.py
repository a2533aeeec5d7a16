"""Reference solution: LoRA merge and unmerge (exercises/lora.py)."""
import torch


def merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    return weight + ((lora_B @ lora_A) * (alpha / rank)).to(weight.dtype)  # (out, r) @ (r, in) = (out, in)


def unmerge(merged: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    return merged - ((lora_B @ lora_A) * (alpha / rank)).to(merged.dtype)
