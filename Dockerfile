# One image for every seal service; the compose file picks the service with `seal serve <kind>`.
#
# TORCH_VARIANT picks the torch build, as the name of a wheel index at download.pytorch.org/whl/:
#   docker build -t seal:cpu .                                   # cpu (the default): the gateway, CPU hosts
#   docker build --build-arg TORCH_VARIANT=cu128 -t seal:cu128 .  # CUDA 12.8: teacher, student, auditor on GPUs
# (cu126 and other indexes of that site work the same way.) The CUDA wheels carry their own CUDA
# libraries, so a GPU host needs only the NVIDIA driver and the NVIDIA Container Toolkit. The build
# fails if the torch it installed is not the variant asked for, so an image tagged for CUDA cannot
# hold a CPU torch (and the reverse).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SEAL_TORCH_VARIANT=${TORCH_VARIANT}
WORKDIR /app

# torch first, from the chosen index: `pip install .` below then finds "torch>=2.4" satisfied and
# does not pull PyPI's default build over it.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
 && python -c "import sys, torch; v = torch.__version__; \
sys.exit(0 if v.endswith('+${TORCH_VARIANT}') else f'torch {v} is not the ${TORCH_VARIANT} build')"

COPY pyproject.toml README.md ./
COPY proto proto
COPY seal seal
COPY teacher teacher
COPY student student
COPY auditor auditor
COPY gateway gateway
RUN pip install . && seal --help > /dev/null

# Runs as root: compose mounts file secrets (keys written 0600 by `seal certs` / `seal keys`) with
# the host's owner and mode, which another user in the container could not read.
ENV SEAL_DATA_DIR=/data SEAL_CACHE_DIR=/cache
VOLUME ["/data", "/cache"]
# gRPC, the gateway's HTTP/JSON API, Prometheus /metrics
EXPOSE 50051 8080 9100
ENTRYPOINT ["seal"]
