# One image for every hublaunch process: the Hub (with its proxy), the API, the worker, beat and
# the one-shot migration. docker-compose.yml picks the command. Build from the repository root.
FROM python:3.11-slim

# Node.js runs configurable-http-proxy, the proxy JupyterHub starts as its child process.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm \
    && npm install --global --no-audit --no-fund configurable-http-proxy@^5.0.1 \
    && npm cache clean --force \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the package sources: no .venv, node_modules, local state or tests in the image.
WORKDIR /opt/hublaunch
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY hub ./hub
COPY hublaunch ./hublaunch
COPY sandbox ./sandbox
COPY migrations ./migrations
# repo2docker drives the Docker daemon of the `builder` service, DockerSpawner the session
# containers of the `hub` service (docker-compose.yml).
RUN pip install ".[repo2docker,docker]"

# Everything runs as an unprivileged user. Its working directory holds the relative state:
# .hublaunch/ (beat's schedule) and hub/ (the Hub's database and cookie secret);
# docker-compose.yml mounts volumes there. Both are the service's alone (0700); a new named
# volume starts with the mode and owner of the folder it is mounted on.
RUN useradd --create-home --uid 10001 --user-group hublaunch \
    && mkdir -p /srv/hublaunch/.hublaunch /srv/hublaunch/hub \
    && chown -R hublaunch:hublaunch /srv/hublaunch \
    && chmod 0700 /srv/hublaunch/.hublaunch /srv/hublaunch/hub
USER hublaunch
WORKDIR /srv/hublaunch

# 8000: the proxy (the public address, in the hub service); 8010: the HTTP app.
EXPOSE 8000 8010
# The default command's: the app answers. Services running another command of this image
# (worker, builder, beat, migrate) set their own in docker-compose.yml.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8010/api/openapi.json', timeout=4)"]
CMD ["hublaunch", "api", "--host", "0.0.0.0"]
