"""Which of a policy's autoscale settings its ``autoscale.mode`` cannot carry out.

The hpa and keda modes hand scaling to a HorizontalPodAutoscaler or a KEDA ScaledObject, which
have no scale-down forecast, and an HPA cannot keep a pool at zero replicas. Without a word, a user
who set such a field would believe it in force; the reconciler reports these as a
``SettingsIgnored`` condition and a Warning Event instead. Only values that differ from the
defaults are reported: a default is no one's choice.
"""

from __future__ import annotations

from disagg_worker.policy import Autoscale

ROLES = ("prefill", "decode")


def ignored_settings(autoscale: Autoscale) -> list[str]:
    """One line per setting the mode ignores or overrides, naming the field and what happens instead."""
    mode = autoscale.mode
    if mode not in ("hpa", "keda"):
        return []
    notes = []
    for role in ROLES:
        scaling = getattr(autoscale, role)
        if scaling.scale_down_forecast_seconds > 0:
            notes.append(f"autoscale.{role}.scaleDownForecastSeconds ({scaling.scale_down_forecast_seconds:g}): "
                         f"only the builtin planner forecasts; {mode} ignores it")
        if mode == "hpa" and scaling.min_replicas == 0:
            notes.append(f"autoscale.{role}.minReplicas (0): a HorizontalPodAutoscaler keeps at least 1 replica "
                         "(keda can scale to 0)")
    if mode == "hpa" and autoscale.prometheus_url:
        notes.append("autoscale.prometheusUrl: hpa reads the metrics through the cluster's metrics adapter, "
                     "not from this URL")
    return notes
