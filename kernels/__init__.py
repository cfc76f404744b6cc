"""Pallas kernels for openr1-jax, installed under the import name ``openr1_jax_kernels``.

The repository keeps them in a top-level ``kernels/`` folder, but ``setup.py`` installs that folder as
``openr1_jax_kernels`` so it never collides with the unrelated PyPI distribution ``kernels`` (which transformers
may import). Always ``import openr1_jax_kernels``, never ``import kernels``.

Each op gets its own sub-package, layered like jax's own Pallas ops::

    openr1_jax_kernels/<op>/
        __init__.py     the public wrapper: validates shapes, dtypes and block sizes, raising one clear error
                        that names the argument, then calls the custom_vjp function
        <op>.py         a ``jax.custom_vjp`` function whose forward and backward passes each call a
                        ``pallas_call``; it takes a frozen block-size dataclass (hashable, so it can be a static
                        argument) and an ``interpret`` flag that runs the kernel through the Pallas interpreter
                        on CPU
        reference.py    a pure-jnp implementation of the same maths, the ground truth that tests compare the
                        kernel's outputs and gradients against

Which implementation a model uses (TPU Pallas, GPU Pallas or plain XLA) is one switch in the model config, not
something decided here. Tests live in ``tests/kernels/``.
"""

__all__ = []
