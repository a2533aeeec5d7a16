"""Reference solution: int8 weights with their error per row (exercises/quantize.py)."""
import torch


def quantize_int8(weight: torch.Tensor):
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).to(torch.float16)  # (N,): the row's largest |w| becomes 127
    divisor = scales.float().masked_fill(scales == 0, 1.0)  # an all-zero row: any scale decodes q = 0 to 0
    qweight = torch.round(weight / divisor[:, None]).clamp(-127, 127).to(torch.int8)
    error = (weight - qweight.float() * scales.float()[:, None]).abs().amax(dim=1)  # (N,) float32
    return qweight, scales, error
