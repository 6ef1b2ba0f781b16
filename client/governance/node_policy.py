"""The hospital's node policy: limits the coordinator cannot override.

A policy is the hospital's own YAML file (standalone, or under a ``policy:`` key). Every training
and evaluation request is checked against it **before** any local training starts; a request outside it is
refused with a reply naming the rule it broke, and the node keeps running. DP is enforced by the
node: a study that asks for no privacy, or weaker privacy than the policy allows, is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedrad.client.privacy.budget import RoundPlan
from fedrad.client.privacy.ledger import Account, PrivacyLedger
from fedrad.common.config import StudyConfig, load_yaml_model
from fedrad.common.errors import PolicyViolation
from fedrad.common.models import MODELS
from fedrad.common.privacy import epsilon_for


class NodePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    require_dp: bool = True
    max_epsilon_per_study: float = Field(10.0, gt=0)
    max_epsilon_lifetime: float = Field(20.0, gt=0, description="over every study on this dataset")
    max_delta: float = Field(1e-5, gt=0, lt=1)
    min_noise_multiplier: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(5.0, gt=0)
    max_rounds: int = Field(100, ge=1)
    max_local_epochs: int = Field(10, ge=1)
    allowed_models: tuple[str, ...] = ("cnn", "resnet", "resnet18")
    min_hospitals: int = Field(2, ge=1, description="fewest hospitals an aggregation may use")
    require_secure_aggregation: bool = False
    #: Distinct studies (by content, :func:`fedrad.common.config.study_key`) that may ever train on or
    #: evaluate this dataset; a new study beyond it is refused (code 4003) before anything is written.
    max_studies: int = Field(10, ge=1)

    @field_validator("allowed_models")
    @classmethod
    def _known_models(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(MODELS))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown} (known: {sorted(MODELS)})")
        return v

    def version(self) -> str:
        """sha256 of the canonical JSON form: which policy a decision was taken under."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def load_policy(path: str | Path) -> NodePolicy:
    """A policy file: the rules alone, or under a ``policy:`` key."""
    return load_yaml_model(path, NodePolicy, section="policy")


def _study_epsilon(ledger: PrivacyLedger, study_id: str, plan: RoundPlan, account: Account,
                   delta: float | None) -> float:
    hist = [*ledger.history_of(study_id, account), (plan.noise_multiplier, plan.sample_rate, plan.steps)]
    return epsilon_for(history=hist, delta=delta or ledger.delta, accountant=ledger.accountant)


def check_study(*, policy: NodePolicy, study: StudyConfig, secure_aggregation: bool | None = None) -> None:
    """The rules a study must meet before the node does anything for it (train **or** evaluate).

    Raises :class:`PolicyViolation`; needs no ledger or plan (those are checked by :func:`check_request`).
    ``secure_aggregation``: whether the reply leaves masked (default: what the study says).
    """
    _check_static(policy, study, secure_aggregation=study.secure_aggregation.enabled if secure_aggregation is None
                  else secure_aggregation)
    priv = study.privacy
    if priv.enabled:
        _check_dp_settings(policy, study)


def check_request(
    *,
    policy: NodePolicy,
    study: StudyConfig,
    study_id: str,
    ledger: PrivacyLedger | None,
    plan: RoundPlan | None,
    secure_aggregation: bool = False,
    account: Account = "train",
    study_delta: float | None = None,
) -> None:
    """Raise :class:`PolicyViolation` (naming the rule and values) unless the request fits.

    ``secure_aggregation``: the reply will leave masked by SecAgg+ (only
    :mod:`fedrad.client.runtime.secagg_app` says so). ``account``: ``"train"`` for a training round,
    ``"val"`` for an evaluation (its histogram release is held to the same per-study and lifetime
    limits on the ledger's validation account). ``study_delta``: the delta of the study's own epsilon."""
    _check_static(policy, study, secure_aggregation=secure_aggregation)
    priv = study.privacy
    if not priv.enabled:
        return
    _check_dp_settings(policy, study)
    _check_budget(policy, study_id, ledger, plan, account, study_delta)


def _check_static(policy: NodePolicy, study: StudyConfig, *, secure_aggregation: bool) -> None:
    fed, priv, tr = study.federation, study.privacy, study.training
    if policy.require_dp and not priv.enabled:
        raise PolicyViolation("require_dp", "the study asks for training without differential privacy")
    if fed.rounds > policy.max_rounds:
        raise PolicyViolation("max_rounds", f"study asks for {fed.rounds} rounds, policy allows {policy.max_rounds}")
    if tr.local_epochs > policy.max_local_epochs:
        raise PolicyViolation(
            "max_local_epochs", f"study asks for {tr.local_epochs} local epochs, policy allows {policy.max_local_epochs}"
        )
    if study.model.name not in policy.allowed_models:
        raise PolicyViolation(
            "allowed_models", f"model {study.model.name!r} is not allowed (allowed: {list(policy.allowed_models)})"
        )
    if fed.min_hospitals < policy.min_hospitals:
        raise PolicyViolation(
            "min_hospitals",
            f"study aggregates with as few as {fed.min_hospitals} hospital(s), policy requires {policy.min_hospitals}",
        )
    if policy.require_secure_aggregation and not secure_aggregation:
        raise PolicyViolation("require_secure_aggregation", "the study does not use secure aggregation")


def _check_dp_settings(policy: NodePolicy, study: StudyConfig) -> None:
    priv = study.privacy
    if priv.epsilon > policy.max_epsilon_per_study:
        raise PolicyViolation(
            "max_epsilon_per_study", f"study budget epsilon={priv.epsilon:g}, policy allows {policy.max_epsilon_per_study:g}"
        )
    if priv.delta > policy.max_delta:
        raise PolicyViolation("max_delta", f"study delta={priv.delta:g}, policy allows {policy.max_delta:g}")
    if priv.max_grad_norm > policy.max_grad_norm:
        raise PolicyViolation(
            "max_grad_norm", f"study clips at {priv.max_grad_norm:g}, policy allows at most {policy.max_grad_norm:g}"
        )


def _check_budget(policy: NodePolicy, study_id: str, ledger: PrivacyLedger | None, plan: RoundPlan | None,
                  account: Account, study_delta: float | None) -> None:
    if plan is None or ledger is None:
        raise PolicyViolation("require_dp", "no privacy plan for a DP study (internal error: refusing)")
    if plan.noise_multiplier < policy.min_noise_multiplier:
        raise PolicyViolation(
            "min_noise_multiplier",
            f"this {'evaluation' if account == 'val' else 'round'} would use noise multiplier "
            f"{plan.noise_multiplier:.3f}, policy requires >= "
            f"{policy.min_noise_multiplier:g}",
        )
    per_study = _study_epsilon(ledger, study_id, plan, account, study_delta)
    if per_study > policy.max_epsilon_per_study:
        raise PolicyViolation(
            "max_epsilon_per_study",
            f"this study would reach epsilon {per_study:.3f} on this dataset, policy allows {policy.max_epsilon_per_study:g}",
        )
    lifetime = ledger.preview(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                              account=account)
    if lifetime > policy.max_epsilon_lifetime:
        raise PolicyViolation(
            "max_epsilon_lifetime",
            f"this request would take the dataset's lifetime {account} epsilon to {lifetime:.3f}, policy allows "
            f"{policy.max_epsilon_lifetime:g}",
        )
