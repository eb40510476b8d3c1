"""Capture: the torch.compile backend that receives Dynamo's graph and compiles forward and backward."""

from .compiler import CompileReport, Fp4Backend, backend, fp4_backend

__all__ = ["Fp4Backend", "CompileReport", "backend", "fp4_backend"]
