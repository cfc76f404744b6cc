"""YAML presets (models, recipes, meshes, ablations), installed as the package ``openr1_jax._configs``.

This file only makes the folder a regular package: setuptools' editable install can map a nested package to
another folder (``configs/`` -> ``openr1_jax._configs``) only when that folder has an ``__init__.py``. Read the
files with ``importlib.resources.files("openr1_jax._configs")``.
"""
