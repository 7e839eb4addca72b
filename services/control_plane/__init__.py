"""The control plane: a FastAPI app that starts distillation jobs on Ray and reports on them.

Job records live in Redis (``services.jobs.store``), so the app holds no state of its own and can
be restarted at any time without losing a job.
"""
