"""Raw text to packed batches: the prepare-time modules (no torch) and the batch-time ones.

The module map is in train/__init__.py.
"""
