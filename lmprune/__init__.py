"""lmprune: find the MLP modules of a language model that carry offensive content, remove them."""

__version__ = "0.1.0"
