"""Streaming data: read planned occurrences from shards, render with the model processor, pack."""
