"""The recipes' Hydra config groups (model, norm, data, trainer, task).

The folder sits at the repository's top level and installs as the package ``adanorm.configs``
(pyproject.toml's ``package-dir``), which ``adanorm-train`` / ``train.py`` read as Hydra's
``pkg://adanorm.configs`` search path: from any directory, from a checkout or a wheel alike.
"""
