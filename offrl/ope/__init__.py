"""Off-policy evaluation: estimate a policy's return from logged data alone, to choose among policies
without running them (FQE, importance sampling, doubly robust; DOPE-style selection metrics)."""

from offrl.ope.fqe import FQE, FQEConfig, FQEResult, fit_fqe
from offrl.ope.importance import (
    doubly_robust,
    effective_sample_size,
    importance_sampling,
    per_decision_importance_sampling,
    policy_log_ratios,
    weighted_importance_sampling,
)
from offrl.ope.metrics import absolute_errors, regret_at_k, spearman
from offrl.ope.run import METHODS, OPEReport, PolicyReport, estimate_policy, run_ope, true_value

__all__ = [
    "FQE",
    "METHODS",
    "FQEConfig",
    "FQEResult",
    "OPEReport",
    "PolicyReport",
    "absolute_errors",
    "doubly_robust",
    "effective_sample_size",
    "estimate_policy",
    "fit_fqe",
    "importance_sampling",
    "per_decision_importance_sampling",
    "policy_log_ratios",
    "regret_at_k",
    "run_ope",
    "spearman",
    "true_value",
    "weighted_importance_sampling",
]
