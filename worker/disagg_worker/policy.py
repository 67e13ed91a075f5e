"""The serving policy: split policy, cache, autoscale, QoS and KV transfer settings (seed 001).

One schema serves every reader: the router and workers load it from a YAML/JSON file (rendered by
the operator into a ConfigMap, or given to ``disagg up --policy``); the operator validates the
``DisaggDeployment`` spec with it. Fields are camelCase; seed 001's snake_case example config loads
unchanged (both spellings are accepted). Unknown fields and bad values fail with the field's path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel


class PolicyError(ValueError):
    """The policy is invalid; the message names each offending field."""


class _Model(BaseModel):
    # allow_inf_nan=False: YAML's .inf / .nan would turn routing scores into NaN (which never wins a
    # comparison, so the first worker always would)
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``true`` where a number belongs is a mistake, not 1. (Not strict mode: that would also refuse
        256.0 for an integer, which the API server accepts for the same resource.)"""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = {annotation, *get_args(annotation)}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("must be a number, not true or false")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_spelling_per_field(cls, data: Any) -> Any:
        """Both spellings of one field (``split_policy`` and ``splitPolicy``) is an error naming the two,
        not a silent choice of one (or a complaint that the valid one is not permitted)."""
        if isinstance(data, dict):
            seen: dict[str, str] = {}
            for key in data:
                if not isinstance(key, str):
                    raise ValueError(f"field names are text, not {key!r}")
                camel = to_camel(key) if "_" in key else key
                if camel in seen:
                    raise ValueError(f"{seen[camel]!r} and {key!r} are the same field: give one")
                seen[camel] = key
        return data


DEFAULT_MODEL = "tiny-llama"


class ModelRef(_Model):
    name: str = Field(DEFAULT_MODEL, min_length=1,
                      description="built-in preset, or the model id clients send for the model at path")
    path: str | None = Field(None, description="local Hugging Face model directory; wins over name")

    @property
    def ref(self) -> str:
        return self.path or self.name

    @property
    def served_name(self) -> str | None:
        """The id clients send for the model at ``path``, when the policy names it; None: the folder's name.
        The default name is no name for it: the CRD fills it in wherever it is left out, and a model
        given by path alone was served as "tiny-llama"."""
        return self.name if self.path and self.name != DEFAULT_MODEL else None


class SplitPolicy(_Model):
    prompt_length_threshold: int = Field(256, ge=0, description="offload prefill when uncached prompt is longer")
    prefix_cache_weight: float = Field(10.0, ge=0)
    queue_length_weight: float = Field(1.5, ge=0)
    decode_load_weight: float = Field(0.5, ge=0)
    enable_hotspot_prevention: bool = True
    hotspot_load_factor: float = Field(
        1.5, ge=1.0, description="a worker loaded above this multiple of the pool mean takes no new cache-affine work")
    prefill_queue_max: int = Field(8, ge=0, description="offload only while the prefill queue is shorter than this")


class CachePolicy(_Model):
    reuse_prefix: bool = True
    min_cache_hit_ratio: float = Field(0.75, ge=0.0, le=1.0,
                                       description="prefix overlap below this fraction of the prompt is ignored")
    block_size: int = Field(16, ge=1, le=1024)


class Thresholds(_Model):
    # above 0: a scale-down below 0 can never hold, and an HPA's averageValue of 0 is refused by the API
    # server (the resource would stay Degraded)
    queue_length: float | None = Field(None, gt=0)
    gpu_utilization: float | None = Field(None, gt=0, le=100, description="percent")
    kv_cache_usage: float | None = Field(None, gt=0, le=100, description="percent")

    def items(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump(by_alias=False).items() if v is not None}


class RoleAutoscale(_Model):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    scale_up: Thresholds = Thresholds()
    scale_down: Thresholds = Thresholds()
    # at most an hour, as the HPA's: the planner keeps an hour of samples
    scale_up_stabilization_seconds: float = Field(30, ge=0, le=3600)
    scale_down_stabilization_seconds: float = Field(300, ge=0, le=3600)
    cooldown_seconds: float = Field(60, ge=0, le=3600)
    max_step: int = Field(2, ge=1, description="most replicas added or removed by one decision")
    # 0: off. Otherwise a scale-down keeps the pods the rising load trend needs this far ahead
    scale_down_forecast_seconds: float = Field(0, ge=0, le=3600)

    @model_validator(mode="after")
    def _check(self) -> RoleAutoscale:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})")
        up, down = self.scale_up.items(), self.scale_down.items()
        for key in up.keys() & down.keys():
            if down[key] >= up[key]:
                raise ValueError(f"scaleDown.{to_camel(key)} ({down[key]}) must be below scaleUp.{to_camel(key)} "
                                 f"({up[key]})")
        return self


# seed 001's values: what a role the policy leaves out, or writes in part, starts from
ROLE_DEFAULTS = {
    "prefill": RoleAutoscale(min_replicas=4, max_replicas=12,
                             scale_up=Thresholds(queue_length=8, gpu_utilization=80),
                             scale_down=Thresholds(queue_length=2, gpu_utilization=40)),
    "decode": RoleAutoscale(min_replicas=8, max_replicas=24,
                            scale_up=Thresholds(queue_length=16, kv_cache_usage=75),
                            scale_down=Thresholds(queue_length=4, kv_cache_usage=30)),
}


# The scale-down forecast fits a trend to 30-s means over 15 minutes and needs 10 of them: sampled
# less often than this, it would never have enough
FORECAST_MAX_INTERVAL = 60.0


class Autoscale(_Model):
    mode: Literal["builtin", "hpa", "keda", "off"] = "builtin"
    interval_seconds: float = Field(15, ge=1, le=600)
    metrics_source: Literal["pods", "prometheus"] = "pods"
    prometheus_url: str | None = None
    drain_timeout_seconds: float = Field(120, ge=0, le=3600)
    prefill: RoleAutoscale = Field(default_factory=lambda: ROLE_DEFAULTS["prefill"])
    decode: RoleAutoscale = Field(default_factory=lambda: ROLE_DEFAULTS["decode"])

    @model_validator(mode="before")
    @classmethod
    def _fill_roles_from_their_defaults(cls, data: Any) -> Any:
        """A role written in part takes the rest from that role's defaults, as an absent one does: so
        ``prefill: {maxReplicas: 6}`` keeps prefill's minReplicas and thresholds (it got the generic
        minReplicas 1 and no thresholds at all, so writing ``prefill: {}`` turned autoscaling off).
        A ``scaleUp`` or ``scaleDown`` given replaces the default's whole. The CRD carries the same
        per-role defaults, so the API server fills a role as this does."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for role, default in ROLE_DEFAULTS.items():
            given = data.get(role)
            if isinstance(given, dict):
                spelled = {(to_camel(k) if isinstance(k, str) and "_" in k else k): v for k, v in given.items()}
                if len(spelled) < len(given):  # both spellings of a field: the role's own check names them
                    continue
                data[role] = {**default.model_dump(by_alias=True, exclude_none=True), **spelled}
        return data

    @model_validator(mode="after")
    def _check(self) -> Autoscale:
        if self.metrics_source == "prometheus" and not self.prometheus_url:
            raise ValueError("metricsSource prometheus needs prometheusUrl")
        for role in ("prefill", "decode"):
            if getattr(self, role).scale_down_forecast_seconds > 0 and self.interval_seconds > FORECAST_MAX_INTERVAL:
                raise ValueError(f"{role}.scaleDownForecastSeconds needs intervalSeconds of at most "
                                 f"{FORECAST_MAX_INTERVAL:g} (its trend is fitted to 30-s means of the last 15 "
                                 f"minutes), not {self.interval_seconds:g}")
        return self


class QoS(_Model):
    enable_early_rejection: bool = True
    low_priority_threshold_ms: float = Field(500, ge=0, le=3_600_000)
    reject_on_slo_violation: bool = True
    ttft_slo_ms: float = Field(200, gt=0, le=3_600_000)
    tpot_slo_ms: float = Field(50, gt=0, le=3_600_000)
    default_priority: Literal["high", "low"] = "high"
    priority_scheduling: bool = Field(True, description="serve high before low in every queue; off = one class: "
                                                        "every request is served as high, none is rejected early")
    retry_after_seconds: int = Field(1, ge=0, le=3600)


class KVTransfer(_Model):
    backend: Literal["grpc", "tcp"] = Field(
        "grpc", description="grpc: chunks on the Prefill stream; tcp: raw-socket data plane (see transfer/tcp.py)")
    chunk_bytes: int = Field(4 << 20, ge=4096, le=64 << 20)
    max_inflight_chunks: int = Field(4, ge=1, le=64, description="bounded memory: chunks buffered per transfer")
    # at most an hour: from ~1e10 s gRPC's deadline overflows and every remote prefill failed at once
    timeout_seconds: float = Field(30, gt=0, le=3600)
    verify_checksums: bool = True


class Policy(_Model):
    """Everything the data plane reads; the operator renders exactly this into the ConfigMap."""

    model: ModelRef = ModelRef()
    split_policy: SplitPolicy = SplitPolicy()
    cache: CachePolicy = CachePolicy()
    autoscale: Autoscale = Autoscale()
    qos: QoS = QoS()
    kv_transfer: KVTransfer = KVTransfer()

    @model_validator(mode="before")
    @classmethod
    def _model_as_string(cls, data: Any) -> Any:
        # seed 001 writes "model": "llama-70b"; the CRD writes model: {name, path}
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"name": data["model"]}}
        return data

    def to_camel_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        # the user's own spelling of a key, camelCased only if it was snake_case (MaxReplicas stays so)
        where = ".".join((to_camel(p) if "_" in p else p) if isinstance(p, str) else f"[{p}]"
                         for p in err["loc"]) or "policy"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def parse_policy(data: dict[str, Any] | None) -> Policy:
    try:
        return Policy.model_validate(data or {})
    except ValidationError as exc:
        raise PolicyError(f"invalid policy: {describe(exc)}") from None


MAX_POLICY_BYTES = 1 << 20  # a policy is a few KiB


def _read_small_file(path: Path) -> bytes:
    """The bytes of a regular file of at most ``MAX_POLICY_BYTES``: a FIFO or a device (``/dev/zero``) given
    as the policy would block the process or grow without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO does not wait for a writer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_POLICY_BYTES:
        raise OSError(f"{path} is larger than {MAX_POLICY_BYTES} bytes")
    return data


def load_policy(path: str | Path | None) -> Policy:
    """Read a policy file (YAML or JSON); None gives the defaults."""
    if path is None:
        return Policy()
    try:
        data = yaml.safe_load(_read_small_file(Path(path)).decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise PolicyError(f"policy file {path} must hold a mapping, not {type(data).__name__}")
    # A whole DisaggDeployment or its spec may be given: take the policy part of it.
    if isinstance(data, dict) and "spec" in data and isinstance(data["spec"], dict):
        data = data["spec"]
    return parse_policy(extract_policy(data or {}))


POD_FIELDS = ("image", "prefill", "decode", "router", "imagePullPolicy", "imagePullSecrets", "serviceAccountName",
              "platformAssignsUser", "monitoring", "podLabels", "podAnnotations")


def extract_policy(spec: dict[str, Any]) -> dict[str, Any]:
    """The policy part of a DisaggDeployment spec (everything but how pods run)."""
    return {k: v for k, v in spec.items() if k not in POD_FIELDS}
