"""Graph passes, one per file: decompose_attention -> find_gemms -> annotate_layers -> assign_precision -> legalize -> rewrite."""

from .annotate_layers import annotate_layers
from .assign_precision import assign_precision
from .decompose_attention import decompose_attention
from .find_gemms import find_gemm_sites
from .legalize import legalize_precision
from .pipeline import PassResult, run_passes
from .rewrite import rewrite_gemms
from .verify import GraphVerificationError, verify_graph

__all__ = ["decompose_attention", "find_gemm_sites", "annotate_layers", "assign_precision", "legalize_precision", "rewrite_gemms",
           "run_passes", "PassResult", "verify_graph", "GraphVerificationError"]
