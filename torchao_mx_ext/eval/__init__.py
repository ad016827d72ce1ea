"""Evaluation: perplexity and measurement helpers."""

from .measure import Measure
from .perplexity import perplexity, tokenize_for_perplexity, wikitext2_test_text

__all__ = ["Measure", "perplexity", "tokenize_for_perplexity", "wikitext2_test_text"]
