"""crystal-monitor: in-line crystallization monitoring from in-situ microscope images.

The daemon package. It never imports torch: a plant box runs it with ONNX Runtime
(or TensorRT) alone; training and export live in `model_zoo`.
"""

__version__ = "0.1.0"
