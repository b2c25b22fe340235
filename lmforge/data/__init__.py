"""Corpus sources, filters and token shards."""
