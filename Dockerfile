# One image for every seal service; the compose file picks the service with `seal serve <kind>`.
# GPU hosts: build with --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX=<a CUDA wheel index>.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY proto proto
COPY seal seal
COPY teacher teacher
COPY student student
COPY auditor auditor
COPY gateway gateway
RUN pip install --no-cache-dir .
ENV SEAL_DATA_DIR=/data SEAL_CACHE_DIR=/cache
VOLUME ["/data", "/cache"]
ENTRYPOINT ["seal"]
