# One image for every dkdm process: Ray head and workers, the control plane, the sampling service.
# CPU PyTorch by default; build with --build-arg TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# for GPU nodes.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
WORKDIR /app
RUN pip install --no-cache-dir ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY dkdm_core ./dkdm_core
COPY services ./services
COPY configs ./configs
# The bundled teacher and classifier are package data (dkdm_core/assets): installed with the package.
RUN pip install --no-cache-dir .
# Jobs write under /app/runs; mount the same volume on every node (Ray Train checkpoints need it).
VOLUME ["/app/runs"]
CMD ["dkdm", "--help"]
