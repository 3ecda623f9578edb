"""Classification heads over cover feature vectors, all following scikit-learn's contract."""

from stylegen.heads.ensemble import EnsembleHead
from stylegen.heads.hierarchical import HierarchicalHead
from stylegen.heads.io import load_head, read_head_info, save_head
from stylegen.heads.knn import KNNHead, vote, vote_multi
from stylegen.heads.linear import LinearHead
from stylegen.heads.mlp import MLPHead

__all__ = [
    "EnsembleHead",
    "HierarchicalHead",
    "KNNHead",
    "LinearHead",
    "MLPHead",
    "load_head",
    "read_head_info",
    "save_head",
    "vote",
    "vote_multi",
]
