"""Memory-layout tests shared by the kernels that pick a path per layout."""
import torch
from torch import Tensor


def is_channels_last(input: Tensor) -> bool:
    """True for channels-last (4-D) or channels_last_3d (5-D) input that is not also plain contiguous."""
    if input.dim() not in (4, 5) or input.is_contiguous():  # the common contiguous case costs one check
        return False
    return input.is_contiguous(memory_format=torch.channels_last_3d if input.dim() == 5 else torch.channels_last)
