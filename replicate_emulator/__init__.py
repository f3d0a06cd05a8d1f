"""A local stand-in for Replicate's HTTP API: see README.md, section "The emulator"."""
from .app import EmulatorServer, create_app
from .emulator import Emulator
from .faults import Faults
from .media import read_stamp

__all__ = ["Emulator", "EmulatorServer", "Faults", "create_app", "read_stamp"]
