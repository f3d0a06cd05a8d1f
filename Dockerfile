# Production image: slim Python, pinned requirements, non-root, gunicorn (one worker, threads).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OUTPUT_DIR=/app/output

WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# The service is the `gateway` package; the root modules are where the spec's layout puts them.
COPY gateway ./gateway
COPY app.py model_functions.py concurrency_manager.py gunicorn.conf.py ./

RUN useradd --create-home --uid 10001 appuser \
    && mkdir -p /app/output \
    && chown appuser:appuser /app/output

USER appuser

EXPOSE 5003
VOLUME ["/app/output"]

# Healthy = ready for traffic (/ready: output volume and journal writable, Redis answering,
# start-up recovery done): its 503 makes the check fail.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('FLASK_PORT', '5003'), timeout=4)" || exit 1

CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
