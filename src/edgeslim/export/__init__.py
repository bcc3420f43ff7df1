"""Exporters that check themselves: ONNX (fp32 / int8 QDQ) verified in ONNX Runtime, int8
TFLite flatbuffers verified in TFLite Micro, and C99 for microcontrollers (``export.c``)
compiled and compared bit for bit."""
