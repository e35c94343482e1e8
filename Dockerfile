# syntax=docker/dockerfile:1
# Stage 1 builds the wheel, compiled queue included; stage 2 runs it with no compiler, as a user.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# With pandas: the demo's churn pipeline, and any model fitted on a DataFrame of strings.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[pandas]'

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'fastserve[pandas]' && rm -rf /wheels \
    && groupadd --gid 10001 fastserve && useradd --create-home --uid 10001 --gid 10001 fastserve
# Numeric, so that a pod's runAsNonRoot can check it (the kubelet refuses a name).
USER 10001:10001
WORKDIR /home/fastserve
# Inside a container the server must listen beyond loopback to be reachable at all.
ENV FASTSERVE_HOST=0.0.0.0 FASTSERVE_PORT=8000
# Bake the demo models in, so the image serves without training at start-up.
RUN fastserve demo /home/fastserve/models && mkdir -p /home/fastserve/state
ENV FASTSERVE_REPOSITORY=/home/fastserve/models
# Deployment state (aliases, canary, audit log): mount a volume here to keep it across
# container restarts.
ENV FASTSERVE_STATE_PATH=/home/fastserve/state/deployments.sqlite
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["fastserve", "serve"]
