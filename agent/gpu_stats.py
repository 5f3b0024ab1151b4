"""GPU utilisation and memory from NVML (nvidia-ml-py, optional) into the agent's Prometheus gauges.

Without the library, a driver or a GPU the probe reports gpu "none" and leaves the gauges unset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from facefleet.agent import metrics

log = structlog.get_logger()

NO_GPU = "none"


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int


class GpuProbe:
    """Reads every visible GPU through NVML; `available` is False when NVML cannot be used."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self.unavailable_reason = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._nvml = pynvml
        except ImportError:
            self.unavailable_reason = "nvidia-ml-py is not installed (pip install 'facefleet[gpu]')"
        except Exception as error:  # pynvml.NVMLError: no driver / no device
            self.unavailable_reason = f"NVML unavailable: {error}"
        if self.unavailable_reason:
            log.info("gpu_probe_unavailable", reason=self.unavailable_reason)

    @property
    def available(self) -> bool:
        return self._nvml is not None and bool(self._handles)

    def sample(self) -> list[GpuSample]:
        if not self.available:
            return []
        nvml = self._nvml
        samples = []
        for index, handle in enumerate(self._handles):
            try:
                name = nvml.nvmlDeviceGetName(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as error:  # a GPU fell off the bus: report it, keep the agent up
                log.warning("gpu_sample_failed", gpu=index, error=str(error))
                continue
            samples.append(
                GpuSample(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    utilization_ratio=float(rates.gpu) / 100.0,
                    memory_used_bytes=int(memory.used),
                    memory_total_bytes=int(memory.total),
                )
            )
        return samples

    def describe(self) -> tuple[str, int]:
        """(gpu name, total memory in MiB) of the first GPU, or ("none", 0)."""
        samples = self.sample()
        if not samples:
            return NO_GPU, 0
        first = samples[0]
        label = first.name if len(samples) == 1 else f"{len(samples)}x {first.name}"
        return label, first.memory_total_bytes // (1024 * 1024)

    def publish(self) -> list[GpuSample]:
        """Sample and set the GPU gauges (label: "<index>:<name>")."""
        samples = self.sample()
        for sample in samples:
            label = f"{sample.index}:{sample.name}"
            metrics.GPU_UTILIZATION.labels(gpu=label).set(sample.utilization_ratio)
            metrics.GPU_MEMORY_USED.labels(gpu=label).set(sample.memory_used_bytes)
        return samples
