"""mmprm-infer: fast, exact process-reward-model scoring and Best-of-N reranking.

    from mmprm_infer import PRM, rerank
    prm = PRM.from_pretrained("path/to/prm")
    res = rerank(question, candidates, prm=prm, aggregate="min")
"""

from mmprm_infer.aggregation import AGGREGATIONS, aggregate
from mmprm_infer.formats import FORMATS, get_format, register_format
from mmprm_infer.prm import PRM, ScoringItem
from mmprm_infer.rerank import RerankResult, rerank, rerank_batch

__version__ = "0.1.0"

__all__ = [
    "PRM", "ScoringItem", "rerank", "rerank_batch", "RerankResult", "aggregate", "AGGREGATIONS",
    "FORMATS", "get_format", "register_format", "__version__",
]
