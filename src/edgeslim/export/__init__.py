"""Exporters that check themselves: ONNX (fp32 / int8 QDQ) verified in ONNX Runtime, OpenVINO
IR (fp32 / int8) verified in OpenVINO Runtime, int8 TFLite flatbuffers verified in TFLite
Micro and LiteRT, fp32 ExecuTorch programs (XNNPACK) verified in ExecuTorch's runtime, and
C99 for microcontrollers (``export.c``) compiled and compared bit for bit."""
