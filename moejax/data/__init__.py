"""Parallel corpora, chunking and tokenisation for the routing analysis."""
