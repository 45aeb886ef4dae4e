"""The Kubernetes operator: a KvflowDeployment CR → Deployments, Services, ConfigMaps, StatefulSets.

Pure modules (spec, objects, workloads, infra, reconcile, status, crd,
manifests) need only msgspec and PyYAML; handlers.py imports kopf (the
`operator` extra). Nothing in the rest of kvflow imports this package.
"""
