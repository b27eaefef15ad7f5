"""Data: sources (files and built-ins), formats (records to tokens), the cached dataset, packing and batching."""
