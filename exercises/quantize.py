"""
Exercise: int8 weights, one scale per row, and what the rounding cost (course part 4; quant.py section 1).

Write `quantize_int8`. Check it with:  python -m pytest exercises/ -k quantize
"""
import torch


def quantize_int8(weight: torch.Tensor):
    """weight (N, K) float -> (qweight int8 (N, K), scales float16 (N,), error float32 (N,)).

    - scale of a row = max |w| of the row / 127, stored as float16 (an all-zero row: scale 0);
    - q = round(w / scale), clamped to -127 .. 127 (symmetric: -128 is never used). Divide by the float16 scale
      converted back to float32, so that encoding and decoding use the same number; for a zero scale divide by 1;
    - error of a row = the largest |w - q * scale| in it (float32). It is at most scale / 2: the test checks.
    """
    raise NotImplementedError("write quantize_int8(weight)")
