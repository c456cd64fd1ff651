"""Image handling shared by the pipeline, offline classification, calibration and the
model zoo: decoding probe files within limits, and the model's preprocessing."""
