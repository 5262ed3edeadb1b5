"""Runtimes: how a round's local training reaches the sites. Algorithms never know which one runs them."""

from fedmi.runtime.base import Runtime
from fedmi.runtime.inprocess import InProcessRuntime

__all__ = ["InProcessRuntime", "Runtime"]
