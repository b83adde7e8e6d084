# One image for every Nova process; the command picks the processor:
#   docker run nova python -m nova.webhooks
# Every process serves Prometheus /metrics and /healthz on NOVA_METRICS_PORT (9100 here; each
# container has its own network namespace, so replicas never collide), which the HEALTHCHECK
# asks.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NOVA_METRICS_PORT=9100

RUN useradd --create-home --uid 10001 nova
WORKDIR /app

# Dependencies first, so code changes do not reinstall them: the runtime ones alone, no extra
# (the demo's embedded Postgres and the test references stay out).
COPY pyproject.toml README.md ./
COPY nova/__init__.py nova/__init__.py
COPY migrations migrations
COPY sql sql
RUN pip install --upgrade pip && pip install .  && pip uninstall -y nova

# .dockerignore leaves nova/sandbox (the demo's simulated providers) out of the build context,
# so the wheel built here has none; every processor must still import without it.
COPY nova nova
RUN pip install --no-deps . \
    && python -c "import nova.webhooks, nova.backfill, nova.threads, nova.completion, \
nova.attachments, nova.receiver, nova.metrics, nova.migrate, nova.cli, nova.service"

USER nova
EXPOSE 8080 9100
# 200 while the process's event loop turns (python -m nova.metrics healthcheck asks the local
# /healthz; it passes when NOVA_METRICS_PORT is unset).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "nova.metrics", "healthcheck"]
# SIGTERM lets in-flight jobs finish (NOVA_SHUTDOWN_GRACE_SECONDS); give the container that long.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "nova"]
