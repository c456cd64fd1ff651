"""Inference: the `Backend` protocol (`backend`), its implementations (`onnxruntime_backend`,
`tensorrt_backend`) and the choice between them (`factory`). Nothing is imported here, so
naming a submodule never loads ONNX Runtime or TensorRT."""
