"""Train, export and evaluate the particle classifiers that `monitor` runs.

This package imports torch; `monitor` never imports it. A trained run directory
becomes a model directory (`model.onnx` + `manifest.json`) through
`python -m model_zoo export`, and that directory is all the daemon needs.
"""
