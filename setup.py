"""Package discovery that pyproject.toml cannot express.

`kernels/` is a top-level folder of the repository but installs as `openr1_jax_kernels`, so it can never
collide with the unrelated PyPI distribution `kernels` (which transformers imports). The folder itself has no
`__init__.py` (see kernels/README.md), so `openr1_jax_kernels` is a namespace package whose op sub-packages are
regular ones. `configs/` ships inside the wheel as `openr1_jax._configs` so installed users get the YAML presets too.
"""

from setuptools import find_packages, setup


def _mapped(folder: str, name: str) -> list[str]:
    return [name] + [f"{name}.{p}" for p in find_packages(where=folder)]


setup(
    packages=find_packages(include=["openr1_jax", "openr1_jax.*"])
    + _mapped("kernels", "openr1_jax_kernels")
    + ["openr1_jax._configs"],
    package_dir={"openr1_jax_kernels": "kernels", "openr1_jax._configs": "configs"},
    # Data files come only from package_data below; without this, setuptools warns that the YAML folders
    # (configs/models, ...) look like packages missing from `packages`.
    include_package_data=False,
    package_data={
        "openr1_jax._configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"],
        # the embedded default's SentencePiece tokenizer, its tiny benchmark files and the pretrained base model
        "openr1_jax.data.embedded": ["tokenizer/*", "benchmarks/*", "base/*"],
    },
)
