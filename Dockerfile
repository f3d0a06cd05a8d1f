# Production image: slim Python, pinned requirements, non-root, gunicorn (one worker, threads).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OUTPUT_DIR=/app/output

WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY app.py auth.py concurrency_manager.py downloads.py errors.py files.py generation.py \
     gunicorn.conf.py jobs.py journal.py json_body.py lost_creates.py model_functions.py redaction.py \
     routes.py routes_jobs.py service.py settings.py shared_limits.py upstream.py webhooks.py ./

RUN useradd --create-home --uid 10001 appuser \
    && mkdir -p /app/output \
    && chown appuser:appuser /app/output

USER appuser

EXPOSE 5003
VOLUME ["/app/output"]

HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FLASK_PORT', '5003'), timeout=4)" || exit 1

CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
