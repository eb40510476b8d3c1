"""The ``node.meta`` keys the passes read and write (each pass's docstring names the ones it uses)."""

#: `GemmMatch` on a GEMM node: its operands as the model wrote them (written by find_gemm_sites).
MATCH = "fp4compile.match"
#: `GemmSite` on a GEMM node (written by find_gemm_sites, completed by annotate_layers).
SITE = "fp4compile.site"
#: Reason string on a node that looks like a weight GEMM but cannot be handled (find_gemm_sites).
UNSUPPORTED = "fp4compile.unsupported"
#: ``dict[Role, Decision]`` on a GEMM node (assign_precision, then legalize_precision).
DECISIONS = "fp4compile.decisions"
#: The encoded `LinearPrecision` on the ``fp4_linear`` node that replaced a GEMM (rewrite_gemms).
PRECISION = "fp4compile.precision"
#: `GemmPaths` on a GEMM node with an FP4 role: how each role's GEMM runs (choose_gemm_paths), then handed to
#: ``fp4_linear`` by rewrite_gemms.
GEMM_PATHS = "fp4compile.gemm_paths"
