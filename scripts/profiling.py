"""The GPU kernels of one call, for the profiling scripts (importable as `profiling` from scripts/)."""
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_times(fn, name_width: int = 70):
    """(number of kernels, busy microseconds, microseconds by kernel name, launches by kernel name) of one
    call of `fn`."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name, calls = Counter(), Counter()
    for e in kernels:
        by_name[e.name[:name_width]] += e.device_time
        calls[e.name[:name_width]] += 1
    return len(kernels), sum(e.device_time for e in kernels), by_name, calls
