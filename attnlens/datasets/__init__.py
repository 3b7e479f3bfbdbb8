"""Datasets attnlens ships.

- :mod:`attnlens.datasets.shapesref`: ShapesRef, the synthetic world of coloured shapes (images,
  videos, exact masks, captions, referring expressions, word-level tokenizer) that the embedded
  models are trained on and measured against.
"""
