"""disagg_operator: the kopf operator that reconciles DisaggDeployment resources.

Layers (see docs/operator.md):

- ``spec``        the resource's schema (pydantic) and the semantic checks the API server cannot do
- ``crd``         the CRD generated from ``spec`` (structural schema, CEL rules, printer columns)
- ``builders``    pure: spec -> desired child objects
- ``diff``        pure: desired vs observed -> actions
- ``conditions``  pure: status conditions and the status block
- ``autoscale``   pure: the planner's scaling decision
- ``metrics``     pure parsing of worker metrics + the operator's own Prometheus metrics
- ``kube``        the one module that talks to the Kubernetes API
- ``reconcile``   glue: read, compute, write (takes a ``kube`` client, so tests can pass a fake)
- ``planner``     glue for the built-in autoscaler loop
- ``handlers``    thin kopf handlers; ``run`` is ``disagg operator``
"""

GROUP = "disagg.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DisaggDeployment"
PLURAL = "disaggdeployments"
SINGULAR = "disaggdeployment"
SHORT_NAMES = ("dd",)

DEFAULT_IMAGE = "ghcr.io/disagg/disagg:0.1.0"
OPERATOR_IMAGE = "ghcr.io/disagg/disagg-operator:0.1.0"
FIELD_MANAGER = "disagg-operator"
