"""Pixels to features: backbones, Gram (style) and pooled (content) vectors, and the runtimes
(torch, ONNX Runtime, OpenVINO) with their exported graphs."""
