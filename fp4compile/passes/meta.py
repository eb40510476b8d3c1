"""The ``node.meta`` and ``gm.meta`` keys the passes read and write (each pass's docstring names the ones it uses)."""

#: `GemmMatch` on a GEMM node: its operands as the model wrote them (written by find_gemm_sites).
MATCH = "fp4compile.match"
#: `GemmSite` on a GEMM node (written by find_gemm_sites, completed by annotate_layers).
SITE = "fp4compile.site"
#: ``((module path, class name), ...)``, outermost first: the modules a GEMM site's call runs inside, with the
#: paths the site's module path uses (find_gemm_sites; annotate_layers finds block stacks from them).
SCOPES = "fp4compile.scopes"
#: The module path of a node marked `UNSUPPORTED`, as the user names it (find_gemm_sites).
MODULE = "fp4compile.module"
#: Reason string on a node that looks like a weight GEMM but cannot be handled (find_gemm_sites).
UNSUPPORTED = "fp4compile.unsupported"
#: ``dict[Role, Decision]`` on a GEMM node (assign_precision, then legalize_precision).
DECISIONS = "fp4compile.decisions"
#: The encoded `LinearPrecision` on the ``fp4_linear`` node that replaced a GEMM (rewrite_gemms).
PRECISION = "fp4compile.precision"
#: `GemmPaths` on a GEMM node with an FP4 role: how each role's GEMM runs (choose_gemm_paths), then handed to
#: ``fp4_linear`` by rewrite_gemms.
GEMM_PATHS = "fp4compile.gemm_paths"

#: ``gm.meta`` (the graph module, not a node): a callable ``tensor -> tuple[str, ...]`` giving the names of a
#: parameter in the user's model, set by the backend when it knows the model (find_gemm_sites reads it).
PARAMETER_NAMES = "fp4compile.parameter_names"
#: ``gm.meta``: the model's block stacks (``tuple[BlockStack, ...]``) when the backend knows the model
#: (annotate_layers reads it).
MODEL_STACKS = "fp4compile.model_stacks"
