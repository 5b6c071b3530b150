"""Deployment: pure renderers of images' build configs and Cloud Run / Kubernetes manifests from
the Config, plus a thin gcloud wrapper that applies them (`sqltune deploy ...`)."""
