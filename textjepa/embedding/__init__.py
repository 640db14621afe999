"""How a model directory turns texts into vectors, as shipped: below both training and evaluation.

  model_dir.py                     which folder to load, the longest input it takes
  encoder.py                       SentenceEncoder: the encoder + pooling + the shipped post-processing + L2
  postprocessing.py                SIF token weights and whitening: fit, apply, save into / load from a model dir
  sentence_transformers_export.py  the same pipeline written as a sentence-transformers layout

The trainer's export and `textjepa whiten` write the post-processing; every evaluation reads it through
SentenceEncoder.
"""
