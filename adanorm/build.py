"""``python -m adanorm.build``: compile the CPU kernels ahead of first use (container images, CI).

Exits non-zero when they cannot be built, after the warning that says why.
"""
import sys

from adanorm.functional.dispatch import cpu_kernels

if __name__ == "__main__":
    kernels = cpu_kernels()
    print(f"adanorm CPU kernels: {kernels.__file__ if kernels is not None else 'not available'}")
    sys.exit(0 if kernels is not None else 1)
