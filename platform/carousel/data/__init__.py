"""Corpora -> tokenizers -> Arrow shards + manifest -> per-rank TBPTT streams."""
