"""Training and inference recipes (Lightning + Hydra + MONAI) around the adaptive layers.

Kept apart from the core: importing ``adanorm`` never imports Lightning or Hydra.
"""
