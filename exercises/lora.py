"""
Exercise: LoRA merge and unmerge (course part 3; imp.py section 6, LoRALinear).

A LoRA layer computes y = W x + b + (alpha / rank) B (A x) with W frozen, A (rank, in), B (out, rank). Merging
folds the update into W, so inference costs nothing extra; unmerging takes it out again (to keep training, or to
swap adapters). Write both. Check them with:  python -m pytest exercises/ -k lora
"""
import torch


def merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """The merged weight (out, in): the plain Linear that computes what the LoRA layer computes. Return a new
    tensor in weight's dtype; do not change `weight` in place."""
    raise NotImplementedError("write merge(weight, lora_A, lora_B, alpha, rank)")


def unmerge(merged: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """The base weight back from a merged one: merge's inverse (up to float rounding)."""
    raise NotImplementedError("write unmerge(merged, lora_A, lora_B, alpha, rank)")
