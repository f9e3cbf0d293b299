"""Input properties shared by the kernel backends (CPU fused, Triton): the dtypes they compute in,
and the memory-layout tests of the kernels that pick a path per layout."""
import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Input dtypes the fused CPU and Triton kernels take; inputs of any other dtype keep the native kernels."""


def is_channels_last(input: Tensor) -> bool:
    """True for channels-last (4-D) or channels_last_3d (5-D) input that is not also plain contiguous."""
    if input.dim() not in (4, 5) or input.is_contiguous():  # the common contiguous case costs one check
        return False
    return input.is_contiguous(memory_format=torch.channels_last_3d if input.dim() == 5 else torch.channels_last)


def native_memory_format(input: Tensor) -> torch.memory_format:
    """The layout PyTorch's CPU norm kernels compute in and return for ``input`` (c10's
    ``suggest_memory_format``, which Python does not expose): channels-last also for strided views
    of channels-last tensors, which ``empty_like`` lays out that way."""
    if input.dim() not in (4, 5) or input.is_contiguous():
        return torch.contiguous_format
    channels_last = torch.channels_last_3d if input.dim() == 5 else torch.channels_last
    if input.is_contiguous(memory_format=channels_last) or torch.empty_like(input).is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format
