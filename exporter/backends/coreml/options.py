"""[target.coreml]: the options of the coreml target."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import invalid_field

COMPUTE_UNITS = {"cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE", "all": "ALL"}
DEPLOYMENT_TARGETS = ("iOS18", "macOS15")


@dataclass(frozen=True, kw_only=True)
class CoreMLOptions:
    compute_units: str = "cpu_only"
    deployment_target: str = "iOS18"

    def __post_init__(self) -> None:
        if self.compute_units not in COMPUTE_UNITS:
            invalid_field("target.coreml.compute_units",
                          f"{self.compute_units!r} is not one of {', '.join(COMPUTE_UNITS)}")
        if self.deployment_target not in DEPLOYMENT_TARGETS:
            invalid_field("target.coreml.deployment_target",
                          f"{self.deployment_target!r} is not one of {', '.join(DEPLOYMENT_TARGETS)} "
                          f"(stateful KV cache needs iOS 18 / macOS 15)")
