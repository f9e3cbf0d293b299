"""The recipes' Hydra config groups (model, norm, data, trainer, task), shipped inside the package.

``adanorm-train`` / ``train.py`` read them as Hydra's ``pkg://adanorm.configs`` search path, so they
work from any directory and from a wheel. Nothing to import here: the YAML files are package data.
"""
