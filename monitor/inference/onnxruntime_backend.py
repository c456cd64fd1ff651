"""ONNX Runtime backend: CPU everywhere, the CUDA provider when the host has one."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from monitor.manifest import LoadedModel


class OnnxRuntimeBackend:
    """One InferenceSession over the model's ONNX file, shared by all probes."""

    def __init__(self, model: LoadedModel, *, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ONNX Runtime's workers spin between batches by default; in the daemon they share
        # the cores with decoding and the recorder, so spinning only steals their time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider",) if p in available]
        providers.append("CPUExecutionProvider")
        self._session = ort.InferenceSession(
            str(model.onnx_path), sess_options=options, providers=providers
        )
        self._input_name = self._session.get_inputs()[0].name
        self._output_name = self._session.get_outputs()[0].name
        self.providers: list[str] = list(self._session.get_providers())
        self.name = f"onnxruntime[{self.providers[0]}]"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        (probabilities,) = self._session.run(
            [self._output_name], {self._input_name: np.ascontiguousarray(batch, np.float32)}
        )
        return np.asarray(probabilities, dtype=np.float32)

    def close(self) -> None:
        del self._session
