"""Exporters: files that run outside PyTorch (TFLite flatbuffers, C99 for microcontrollers).

Every exporter runs what it wrote and compares it with a reference before it reports
success.
"""
