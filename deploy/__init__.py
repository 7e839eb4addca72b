"""Deployment files; ``python -m deploy.dashboards`` writes the Grafana dashboard."""
