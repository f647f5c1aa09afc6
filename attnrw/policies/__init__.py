"""The policies, each registered in its own module; :mod:`attnrw.policies.base` holds the contract.

Importing this package registers the built-in policies (in this order, which
is also the order of Auto's default ladder and of ``--policy``'s choices).
"""

from attnrw.policies.base import (
    DEFAULT_BLOCK_SIZE,
    FieldInfo,
    Keep,
    Lowering,
    Policy,
    dense_flops,
    get_policy,
    policy_fields,
    policy_from_dict,
    register_policy,
    registry,
)
from attnrw.policies.dense import Dense
from attnrw.policies.sparse import Sparse
from attnrw.policies.condense import Condense
from attnrw.policies.merge import Merge
from attnrw.policies.auto import Auto
from attnrw.policies.bias import Bias

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "Auto",
    "Bias",
    "Condense",
    "Dense",
    "FieldInfo",
    "Keep",
    "Lowering",
    "Merge",
    "Policy",
    "Sparse",
    "dense_flops",
    "get_policy",
    "policy_fields",
    "policy_from_dict",
    "register_policy",
    "registry",
]
