"""The embedded default: a synthetic verifiable reasoning task and the small tokenizer trained on it.

Nothing is downloaded: rows come from `load_rows`, the tokenizer from the folder `TOKENIZER_DIR` (regenerate it
with `python -m openr1_jax.data.embedded.train_tokenizer`).
"""

from pathlib import Path

from openr1_jax.data.embedded.task import extract_boxed, is_correct, load_rows

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"

__all__ = ["TOKENIZER_DIR", "extract_boxed", "is_correct", "load_rows"]
