"""The frame pipeline, in the order a frame goes through it.

frame_queue (shared by all probes) -> workers (decode, quality_gate, sampling)
-> batcher (micro-batches to the inference backend) -> recorder (store, then the
windows). `outcome` holds what a frame became.
"""
