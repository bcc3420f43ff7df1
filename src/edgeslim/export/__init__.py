"""Exporters that check themselves: ONNX (fp32 / int8 QDQ) verified in ONNX Runtime."""
