"""Stateless normalization core: the functional API (``api``) over one dispatch point (``dispatch``)
from (device, mode, layout, size) to a kernel; modules own the parameters and running statistics."""
from adanorm.functional.api import adaptive_norm, affine_only, grouped_norm, groups_for_mode
from adanorm.functional.renorm import RenormClip, RenormLimits

__all__ = ["adaptive_norm", "affine_only", "grouped_norm", "groups_for_mode", "RenormClip", "RenormLimits"]
