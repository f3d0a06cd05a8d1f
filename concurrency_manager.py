"""Rate limiting and concurrency control, where the spec's file layout puts it.

The limits live in `gateway.engine.limits`; these names are re-exported so imports of
`concurrency_manager` keep working.
"""
from gateway.engine.limits import Lane, LaneManager, Pacer, RateWindow, SlotPool

__all__ = ["Lane", "LaneManager", "Pacer", "RateWindow", "SlotPool"]
